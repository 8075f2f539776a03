"""Nightly operations: the progress line, metrics on Ray's Prometheus endpoint, and the ``plan=true`` dry run.

One local Ray with a metrics export port and one scoring run serve every Ray test here; the
progress line tests need no Ray.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.progress import Progress, TrainingProgress, format_seconds

ROWS_PER_FILE = 150


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_rate_over_the_last_minute_eta_and_errors(caplog):
    caplog.set_level(logging.INFO, logger="test.progress")
    clock = FakeClock()
    progress = Progress("score", 1000, errors="error rows", every_s=30, tty=False, logger=logging.getLogger("test.progress"),
                        clock=clock, timer=False)
    clock.now += 40
    progress.advance(400, errors=2)  # 10 rows/s so far: a line (40 s since the start)
    clock.now += 20
    progress.advance(100)  # 20 s after the last line: none
    clock.now += 40
    progress.advance(100, errors=1)  # the last minute: 200 rows in 60 s
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["score: rows 400/1,000 (40%), 10.0 rows/s (so far), ETA 1m00s, 2 error rows",
                     "score: rows 600/1,000 (60%), 3.3 rows/s (last min), ETA 2m00s, 3 error rows"]
    assert progress.eta_s() == pytest.approx(120)
    clock.now += 10
    progress.advance(400)  # done: no periodic line, close() gives the last one
    progress.close()
    progress.close()
    assert caplog.records[-1].getMessage() == "score: rows 1,000/1,000 done, 9.1 rows/s, in 1m50s, 3 error rows"
    assert len(caplog.records) == 3
    assert progress.summary() == {"rows": 1000, "total": 1000, "seconds": 110.0, "rows_per_s": 9.091, "errors": 3}


def test_progress_timer_logs_while_nothing_commits(caplog):
    caplog.set_level(logging.INFO, logger="test.progress")
    progress = Progress("score", 10, every_s=0.2, tty=False, logger=logging.getLogger("test.progress"))
    time.sleep(1.5)  # the timer wakes every 0.2 s
    progress.close()
    assert any(r.getMessage().startswith("score: rows 0/10 (0%), 0.0 rows/s (so far), ETA ?") for r in caplog.records)


def test_progress_on_a_terminal_updates_one_bar(capsys):
    clock = FakeClock()
    progress = Progress("score", 300, errors="error rows", tty=True, clock=clock, timer=False)
    for _ in range(3):
        clock.now += 1
        progress.advance(100, errors=1)
    progress.close()
    err = capsys.readouterr().err
    assert "300/300 rows" in err and "100.0 rows/s, in 3s, 3 error rows" in err
    assert err.count("\n") == 1  # one line, redrawn in place


def test_training_progress_line_and_same_style(caplog):
    caplog.set_level(logging.INFO, logger="test.train")
    progress = TrainingProgress(epoch=0, epochs=2, steps=10, every=0.0, world=2, logger=logging.getLogger("test.train"))
    progress.update(batches=5, rows=160, loss=0.5)
    assert re.fullmatch(r"epoch 1/2: batch 5/10 \(50%\), mean loss 0\.5000, [\d,.]+ examples/s \(so far\), ETA \d+s",
                        caplog.records[-1].getMessage())
    assert format_seconds(75) == "1m15s" and format_seconds(3725) == "1h02m" and format_seconds(None) == "?"


# --- one local Ray with a metrics export port, one scoring run ------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_input(path: Path, index: int) -> None:
    ids = [f"f{index}-{i:04d}" for i in range(ROWS_PER_FILE)]
    texts = [("great value " if i % 3 else "broke in a day ") * (1 + i % 9) + f"#{i}" for i in range(ROWS_PER_FILE)]
    pq.write_table(pa.table({"id": ids, "text": texts}), path / f"part-{index}.parquet")


def _snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under ``roots`` with its bytes (directories too, as None)."""
    files = {}
    for root in roots:
        if root.exists():
            for p in sorted(root.rglob("*")):
                files[str(p)] = p.read_bytes() if p.is_file() else None
    return files


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum over Ray's worker series of a metric's samples with these labels (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


@pytest.fixture(scope="module")
def scoring_run(tmp_path_factory, tiny_model_dir, _ray_session):
    """A dry run on a fresh output, a scoring run, Prometheus scraped, then a dry run on a grown input."""
    import ray

    from jobs import score as score_job
    from pipelines.score import ScoreConfig, run_score

    if ray.is_initialized():
        ray.shutdown()  # this module needs Ray's metrics on a known port
    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 1000})
    root = tmp_path_factory.mktemp("observability")
    inp, out = root / "in", root / "out"
    inp.mkdir()
    for i in range(2):
        _write_input(inp, i)
    args = dict(input=str(inp), output=str(out), model=str(tiny_model_dir), rows_per_file=100, block_rows=64,
                precision="fp32", profile=False)
    result = {"port": port, "out": out, "inp": inp}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTCLS_VERBOSE", "0")
        before = _snapshot(inp, root)
        result["plan_fresh"] = score_job.main([f"{k}={v}" for k, v in args.items()] + ["plan=true"])
        result["fresh_unchanged"] = before == _snapshot(inp, root)
        result["fresh_output_made"] = out.exists()
        result["manifest"] = run_score(ScoreConfig(**args))
        rows = result["manifest"]["rows_out"]
        deadline = time.monotonic() + 60  # metrics reach the endpoint within a few report intervals
        while True:
            text = _scrape(port)
            labels = dict(job="score", output=str(out))
            if metric_value(text, "ray_mtcls_score_rows_committed_total", **labels) >= rows and \
                    metric_value(text, "ray_mtcls_score_rows_scored_total", **labels) >= rows or time.monotonic() > deadline:
                break
            time.sleep(1)
        result["metrics"] = text
        _write_input(inp, 2)  # a new input file: its rows are pending
        before = _snapshot(inp, out)
        result["plan_grown"] = score_job.main([f"{k}={v}" for k, v in args.items()] + ["plan=true"])
        result["grown_unchanged"] = before == _snapshot(inp, out)
        result["grown_files"] = set(before), set(_snapshot(inp, out))
    yield result
    ray.shutdown()  # the next test asking for ray_local starts the session's Ray again


def test_scoring_metrics_reach_the_prometheus_endpoint(scoring_run):
    text, labels = scoring_run["metrics"], dict(job="score", output=str(scoring_run["out"]))
    rows = 2 * ROWS_PER_FILE
    assert scoring_run["manifest"]["rows_out"] == rows
    assert metric_value(text, "ray_mtcls_score_rows_committed_total", **labels) == rows
    assert metric_value(text, "ray_mtcls_score_rows_scored_total", **labels) == rows
    assert metric_value(text, "ray_mtcls_score_rows_errored_total", **labels) == 0
    assert metric_value(text, "ray_mtcls_score_error_rows_committed_total", **labels) == 0
    assert metric_value(text, "ray_mtcls_score_rows_pending", **labels) == 0
    tokens = metric_value(text, "ray_mtcls_score_tokens_total", **labels)
    padded = metric_value(text, "ray_mtcls_score_padded_tokens_total", **labels)
    assert 0 < tokens <= padded
    assert metric_value(text, "ray_mtcls_score_block_seconds_count", **labels) >= 1
    for head in ("trust", "type", "tags", "topic", "sphere"):
        assert 0 < metric_value(text, "ray_mtcls_score_mean_top_probability", head=head, **labels) <= 1


def test_the_manifest_keeps_the_same_figures(scoring_run):
    text, labels = scoring_run["metrics"], dict(job="score", output=str(scoring_run["out"]))
    figures = scoring_run["manifest"]["metrics"]
    assert figures["rows_committed"] == figures["rows_scored"] == 2 * ROWS_PER_FILE
    assert figures["error_rows_committed"] == figures["rows_errored"] == 0
    assert figures["files_committed"] == scoring_run["manifest"]["output_files"]
    assert figures["tokens"] == metric_value(text, "ray_mtcls_score_tokens_total", **labels)
    assert figures["padded_tokens"] == metric_value(text, "ray_mtcls_score_padded_tokens_total", **labels)
    assert figures["padding_fraction"] == pytest.approx(1 - figures["tokens"] / figures["padded_tokens"], abs=1e-4)
    assert figures["blocks"] >= 1 and figures["block_seconds_max"] > 0 and figures["gpu_memory_max_bytes"] is None


def test_a_dry_run_on_a_fresh_output_writes_nothing(scoring_run):
    plan = scoring_run["plan_fresh"]
    assert scoring_run["fresh_unchanged"]  # the input byte for byte
    assert not scoring_run["fresh_output_made"]  # no output directory: no _mtcls/, no lock file
    assert plan["plan"] is True and plan["rows"] == plan["rows_pending"] == 2 * ROWS_PER_FILE
    assert plan["rows_committed"] == 0 and plan["units"] == plan["units_pending"] == 4
    assert len(plan["input_files"]) == 2 and plan["resources"]["num_actors"] >= 1
    estimate = plan["estimate"]
    assert estimate["sample_rows"] > 0 and estimate["rows_per_s_per_actor"] > 0
    expected = plan["rows_pending"] / (estimate["rows_per_s_per_actor"] * plan["resources"]["num_actors"])
    assert estimate["seconds"] == pytest.approx(expected, rel=0.05, abs=1e-3)


def test_a_dry_run_reads_what_is_committed_without_the_lease(scoring_run):
    plan = scoring_run["plan_grown"]
    before, after = scoring_run["grown_files"]
    assert scoring_run["grown_unchanged"] and before == after  # byte for byte: no lease taken, no file added
    assert plan["rows"] == 3 * ROWS_PER_FILE
    assert plan["rows_committed"] == 2 * ROWS_PER_FILE and plan["rows_pending"] == ROWS_PER_FILE
    assert plan["units_pending"] == 2 and plan["stale_files"] == 0 and "refused" not in plan
    json.dumps(plan)  # what jobs.score prints
