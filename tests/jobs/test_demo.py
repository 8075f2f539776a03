"""The README's first command, scaled down: generate, train, score, evaluate, summarise, quietly.

It runs as the user runs it (``python -m jobs.demo`` in a subprocess, its own local Ray) and counts
what it prints: stdout and stderr together stay within :data:`MAX_LINES`, and no warning or error
line appears beyond the ones the README explains ("Console output").
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: The budget of ``python -m jobs.demo`` (README, "Console output").
MAX_LINES = 40
#: Lines a healthy run may print that the README explains (Ray's C++ core logs them; see there).
EXPLAINED = ("has constructor arguments in the object store and max_restarts > 0",)


@pytest.mark.slow
def test_demo_runs_the_whole_flow_quietly(tmp_path):
    env = {**os.environ, "MTCLS_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    env.pop("MTCLS_VERBOSE", None)
    proc = subprocess.run([sys.executable, "-m", "jobs.demo", f"output={tmp_path / 'demo'}", "rows=300", "epochs=1"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=580)
    printed = proc.stdout
    assert proc.returncode == 0, printed[-6000:]
    lines = printed.splitlines()  # a progress bar redrawn with "\r" counts once per redraw
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n" + "\n".join(lines)
    loud = [line for line in lines if re.search(r"\b(WARNING|ERROR|Traceback)\b|\] core_worker|^\[[^]]* [EW] \d+ \d+\]", line)
            and not any(e in line for e in EXPLAINED)]
    assert not loud, "\n".join(loud) + "\n--- the whole output:\n" + printed[-8000:]

    summary = json.loads(printed[printed.rindex('{\n  "model"'):])
    assert summary["rows_scored"] == 300
    assert set(summary["test_macro_f1"]) == {"spam", "sentiment", "aspects", "aspect_sentiment"}
    # The summary reports what the evaluation job wrote, for the model the training job exported.
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert summary["test_macro_f1"] == {h: round(r["macro_f1"], 4) for h, r in report["heads"].items()}
    assert report["join"] == {"predictions_without_labels": 0, "labels_without_predictions": 0, "matched": 300}
    assert (tmp_path / "demo" / "model" / "model.safetensors").exists()
    assert (tmp_path / "demo" / "predictions" / "_SUCCESS").exists()
    # The job's own lines: Ray's start, the scoring start summary and progress line.
    assert any("ray: started a local cluster" in line for line in lines)
    assert any(re.search(r"score: rows 300/300 done, [\d,.]+ rows/s, in \S+, 0 error rows", line) for line in lines)
