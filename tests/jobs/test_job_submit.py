"""`ray job submit` against a real local head, the way users launch jobs on a cluster."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    dashboard = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must stay short
    # --block keeps `ray start` in the foreground; stopping it stops exactly this head (not `ray stop`,
    # which would stop every Ray on the machine).
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}", "--disable-usage-stats",
         # Free ports for the node's agent: another Ray on the machine (the test session's own) holds the defaults,
         # and the job server then never finds an agent ("No available agent to submit job").
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(head.pid, signal.SIGTERM)
        pytest.fail("the Ray head's job server did not come up within 120 s")
    yield address, env
    # A graceful stop of the head takes about 30 s; the job is over, so the group is killed after 5 s.
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)


@pytest.mark.slow
def test_ray_job_submit_runs_the_scoring_job(tmp_path, tiny_model_dir, ray_head):
    address, env = ray_head
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(30)], "text": [f"row {i} text" for i in range(30)]}), tmp_path / "in.parquet")
    # On a busy 2-core machine the head's agent has taken over 2 minutes to register.
    deadline = time.time() + 300
    while True:
        result = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
             sys.executable, "-m", "jobs.score", f"input={tmp_path / 'in.parquet'}", f"output={tmp_path / 'out'}",
             f"model={tiny_model_dir}", "progress=false"],
            env=env, capture_output=True, text=True, timeout=600,
        )
        # The job server answers before the node's agent registers; a refused submission ran nothing.
        if "No available agent to submit job" not in result.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout.lower()
    summary = json.loads(result.stdout[result.stdout.index('{\n  "output"'):].split("\n}\n")[0] + "\n}")
    assert summary["rows_out"] == 30 and summary["rows_error"] == 0
    out = pd.read_parquet(tmp_path / "out")
    assert len(out) == 30 and out["id"].is_unique
