"""Real faults during scoring: SIGKILL of the driver, an inference actor and a write task, SIGSTOP past the
lease, then exactly once."""

import json
import re
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.sink.parquet import visible_rows as output_visible_rows
from pipelines.storage import locate

ROOT = Path(__file__).resolve().parents[2]


def write_inputs(path: Path, files: int, rows: int) -> set[str]:
    path.mkdir(parents=True)
    ids = set()
    for k in range(files):
        names = [f"f{k:03d}-{i:05d}" for i in range(rows)]
        texts = [f"review {i} of batch {k}: " + "words " * (i % 40) for i in range(rows)]
        pq.write_table(pa.table({"id": names, "text": texts}), path / f"part-{k:03d}.parquet", row_group_size=100)
        ids |= set(names)
    return ids


def visible_rows(out: Path) -> int:
    return output_visible_rows(locate(str(out)))


def worker_pids(title: str) -> list[int]:
    """Ray worker processes whose title holds ``title`` (Ray titles a busy worker ``ray::<what it runs>``)."""
    pids = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and title.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def score_cmd(inp: Path, out: Path, model: Path, *extra: str, slow: bool = True) -> list[str]:
    """A scoring job of many small files; ``slow``: in forward passes of a few rows (a job to interrupt),
    else at the default batching (a rerun or a second job, which nothing interrupts)."""
    pace = ["block_rows=50", "max_tokens_per_batch=64"] if slow else []
    return [sys.executable, "-m", "jobs.score", f"input={inp}", f"output={out}", f"model={model}", "progress=false",
            "rows_per_file=200", *pace, "num_actors=1", *extra]


def signal_marked(marker: str, sig: int) -> None:
    """Sends ``sig`` to every process whose environment carries the marker (the driver and the Ray it started)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                os.kill(int(pid), sig)
        except (OSError, ProcessLookupError):
            continue


def test_driver_killed_mid_run_then_rerun_scores_each_row_once(tmp_path, tiny_model_dir):
    ids = write_inputs(tmp_path / "in", files=3, rows=1000)
    out = tmp_path / "out"
    marker = f"MTCLS_TEST_{uuid.uuid4().hex}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", marker: "1"}
    job = subprocess.Popen(score_cmd(tmp_path / "in", out, tiny_model_dir), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen: list[int] = []
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None:
        seen.append(visible_rows(out))
        if seen[-1] >= 0.3 * len(ids):
            break
        time.sleep(0.2)
    assert job.poll() is None, "the job finished before it could be killed; make the corpus larger"
    signal_marked(marker, signal.SIGKILL)
    job.wait(timeout=30)
    at_kill = visible_rows(out)
    assert 0 < at_kill < len(ids) and not (out / "_SUCCESS").exists()
    assert len(set(seen)) > 2  # rows became visible while the job ran, in several steps

    # At once, with the default 120 s lease: the dead driver's lease is taken over because its process is gone.
    rerun = subprocess.run(score_cmd(tmp_path / "in", out, tiny_model_dir, slow=False), cwd=ROOT, env={**env, marker: "0"},
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "its process is gone" in rerun.stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    table = pd.read_parquet(out, columns=["id"])
    assert len(table) == len(ids) and set(table["id"]) == ids and table["id"].is_unique
    assert manifest["rows_scored_this_run"] <= len(ids) - at_kill
    assert (out / "_SUCCESS").exists()


def test_inference_actor_and_write_task_killed_mid_run_lose_no_row(tmp_path, tiny_model_dir, ray_local):
    import ray

    from pipelines.score import ScoreConfig, run_score

    ids = write_inputs(tmp_path / "in", files=4, rows=1000)
    out = tmp_path / "out"
    cfg = ScoreConfig(input=str(tmp_path / "in"), output=str(out), model=str(tiny_model_dir), progress=False,
                      rows_per_file=200, block_rows=50, max_tokens_per_batch=64, num_actors=1)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(manifest=run_score(cfg)))
    runner.start()
    killed: dict[str, list[int]] = {"actor": [], "writer": []}
    titles = {"actor": "ray::MapWorker(MapBatches(InferenceActor))", "writer": "ray::MapBatches(write_units)"}
    deadline = time.time() + 240
    while runner.is_alive() and time.time() < deadline and not all(killed.values()):
        if visible_rows(out) > 0:
            # The actor between blocks, and a write task while it runs (busy workers carry its title).
            for what in [w for w, pids in killed.items() if not pids]:
                for pid in worker_pids(titles[what]):
                    os.kill(pid, signal.SIGKILL)
                    killed[what].append(pid)
        time.sleep(0.01)
    runner.join(timeout=600)
    assert killed["actor"], "no inference actor was found alive to kill"
    assert killed["writer"], "no write task was caught running to kill"
    manifest = result["manifest"]
    table = pd.read_parquet(out, columns=["id", "error"])
    assert len(table) == len(ids) and set(table["id"]) == ids and table["id"].is_unique
    assert manifest["rows_out"] == len(ids) and manifest["verification"]["problems"] == []
    assert ray.is_initialized()


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tokenizer):
    from tests.conftest import tiny_model

    path = tmp_path_factory.mktemp("other_model")
    tiny_model(seed=7).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_job_stalled_past_its_lease_commits_nothing_after_another_job_took_over(tmp_path, tiny_model_dir, other_model_dir):
    ids = write_inputs(tmp_path / "in", files=6, rows=1000)
    out = tmp_path / "out"
    marker = f"MTCLS_TEST_{uuid.uuid4().hex}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    first = subprocess.Popen(score_cmd(tmp_path / "in", out, tiny_model_dir, "lock_timeout_s=2"), cwd=ROOT,
                             env={**env, marker: "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None and visible_rows(out) < 0.2 * len(ids):
        time.sleep(0.1)
    assert first.poll() is None, "the first job finished before it could be stopped; make the corpus larger"
    signal_marked(marker, signal.SIGSTOP)  # the driver and its whole Ray, mid-run
    try:
        time.sleep(3)  # past the lease timeout
        second = subprocess.run(score_cmd(tmp_path / "in", out, other_model_dir, "lock_timeout_s=2", "overwrite=true", slow=False),
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "took over the lock" in second.stderr
        done = snapshot(out)
    finally:
        signal_marked(marker, signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode not in (0, 2), stderr[-3000:]
    assert "lost the lock on output" in stderr and "this job must not commit" in stderr
    # The new holder is named: the second job, holding the lease or having released it at its end.
    assert re.search(r"it now belongs to (nobody: it was released by )?run \w+ on host", stderr), stderr[-3000:]
    assert snapshot(out) == done  # byte for byte the second job's output: no file moved in, removed or rewritten
    table = pd.read_parquet(out, columns=["id"])
    assert len(table) == len(ids) and set(table["id"]) == ids and (out / "_SUCCESS").exists()


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under the output, lease records included, with its bytes; not the staging scratch
    (``_mtcls/staging/``: a write task stopped mid-write can leave a partial file there, which no
    reader lists and the next run clears)."""
    staging = root / "_mtcls" / "staging"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and staging not in p.parents}
