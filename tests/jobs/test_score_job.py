"""The scoring recipe end to end through its command-line entry point."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]


def run_job(*args, env_extra=None):
    import os

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "jobs.score", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_bad_config_fails_at_once_naming_the_key(tmp_path, tiny_model_dir):
    result = run_job(f"output={tmp_path}/o", "batch_sise=8")
    assert result.returncode == 2
    assert "unknown key(s) ['batch_sise']" in result.stderr
    assert not (tmp_path / "o").exists()
    missing = run_job(f"output={tmp_path}/o", f"input={tmp_path}/absent.parquet", f"model={tiny_model_dir}")
    assert missing.returncode == 2
    assert f"input path '{tmp_path}/absent.parquet' does not exist" in missing.stderr
    # An input the job cannot identify rows of (a list id column): 2, naming the column, before any output.
    pq.write_table(pa.table({"id": [[1], [2]], "text": ["a", "b"]}), tmp_path / "listed.parquet")
    listed = run_job(f"output={tmp_path}/o", f"input={tmp_path}/listed.parquet", f"model={tiny_model_dir}")
    assert listed.returncode == 2, listed.stderr[-3000:]
    assert "error: id column 'id' is list<element: int64>: it cannot identify rows" in listed.stderr
    assert not (tmp_path / "o").exists()


def test_job_scores_with_a_config_and_prints_a_summary(tmp_path, tiny_model_dir):
    pq.write_table(pa.table({"doc": ["d1", "d2", "d3"], "title": ["a", None, "c"], "body": ["x", "y", None]}), tmp_path / "in.parquet")
    # A model whose reference says its "type" head only ever predicted "ad": any real mix has drifted.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    reference = {"type": {"rows": 100, "mix": [0, 0, 100], "score_hist": [0] * 19 + [100], "score_sum": 99.0, "label_counts": []}}
    (model / "reference_profile.json").write_text(json.dumps({"source": "test", "heads": reference}))
    result = run_job(
        "--config", str(ROOT / "jobs/configs/score/default.yaml"),
        f"input={tmp_path}/in.parquet", f"output={tmp_path}/out", f"model={model}",
        "text_columns=[title,body]", "id_column=doc", "progress=false", "fail_on_drift=true", "drift_min_rows=1",
    )
    # fail_on_drift: everything is written, then exit status 3 for the scheduler, naming the head.
    assert result.returncode == 3, result.stderr[-3000:]
    assert "alert: prediction drift above 0.2 on type (PSI" in result.stderr
    assert (tmp_path / "out" / "_SUCCESS").exists()
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["drift_flagged"] == ["type"]
    assert summary["rows_in"] == summary["rows_out"] == 3 and summary["rows_error"] == 0
    out = pd.read_parquet(tmp_path / "out")
    assert sorted(out["doc"]) == ["d1", "d2", "d3"]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["config"]["text_columns"] == ["title", "body"] and manifest["model"]["uri"] == str(model)
    assert manifest["profile"]["heads"]["type"]["prediction_mix"]["ad"] < 1  # so the mix really moved
