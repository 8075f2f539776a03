"""jobs.evaluate (predictions=) and jobs.drift refuse a scoring output that is not complete, unless allow_incomplete."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import drift as drift_job
from jobs import evaluate as evaluate_job
from pipelines.config import load_config
from pipelines.score import ScoreConfig, run_score
from pipelines.storage import InputError

ROWS = 40
TYPES = ["news", "opinion", "ad"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_model_dir):
    """One real scoring output of the tiny model (the only scoring run of this module, in this process) and its labels."""
    tmp = tmp_path_factory.mktemp("scored")
    ids = [f"r{i:03d}" for i in range(ROWS)]
    pq.write_table(pa.table({"id": ids, "text": [f"review {i}: quick delivery" + " great" * (i % 4) for i in range(ROWS)]}),
                   tmp / "in.parquet")
    pq.write_table(pa.table({"id": ids, "type": [TYPES[i % 3] for i in range(ROWS)]}), tmp / "labels.parquet")
    cfg = load_config(ScoreConfig, None, [f"input={tmp / 'in.parquet'}", f"output={tmp / 'out'}", f"model={tiny_model_dir}",
                                          "progress=false", "rows_per_file=20", "precision=fp32"])
    manifest = run_score(cfg, inline=True)
    assert manifest["status"] == "complete" and (tmp / "out" / "_SUCCESS").exists()
    return tmp


def damaged(scored, target, how):
    """A copy of the scoring output, made incomplete: ``no_success``, ``status`` (manifest says incomplete) or ``no_manifest``."""
    shutil.copytree(scored / "out", target)
    if how == "no_success":
        (target / "_SUCCESS").unlink()
    elif how == "status":
        manifest = json.loads((target / "_manifest.json").read_text())
        (target / "_manifest.json").write_text(json.dumps({**manifest, "status": "incomplete"}))
    elif how == "no_manifest":
        (target / "_manifest.json").unlink()
    return target


WHAT = {"no_success": "no _SUCCESS", "status": 'says "status": "incomplete"', "no_manifest": "no _manifest.json"}


@pytest.mark.parametrize("how", list(WHAT))
def test_evaluate_refuses_an_incomplete_scoring_output(tmp_path, scored, ray_local, how):
    preds = damaged(scored, tmp_path / "preds", how)
    args = [f"predictions={preds}", f"labels={scored / 'labels.parquet'}", f"output={tmp_path / 'report'}", "progress=false", "plots=false"]
    with pytest.raises(InputError, match=rf"scoring output '{preds}' is not complete: .*{WHAT[how]}.*allow_incomplete=true"):
        evaluate_job.main(args)
    assert not (tmp_path / "report").exists()
    if how == "no_success":  # read anyway when asked: the report says so
        report = evaluate_job.main([*args, "allow_incomplete=true"])
        assert report["join"]["matched"] == ROWS == report["rows"] and "type" in report["heads"]
        assert any("no _SUCCESS" in p for p in report["predictions_incomplete"])
        assert json.loads((tmp_path / "report" / "report.json").read_text())["predictions_incomplete"] == report["predictions_incomplete"]


def test_drift_refuses_an_incomplete_partition(tmp_path, scored, caplog):
    root = tmp_path / "scores"
    shutil.copytree(scored / "out", root / "date=2026-11-20")
    damaged(scored, root / "date=2026-11-21", "no_success")
    with pytest.raises(InputError, match=rf"scoring output '{root / 'date=2026-11-21'}' is not complete: no _SUCCESS.*allow_incomplete=true"):
        drift_job.main([f"root={root}"])
    shutil.rmtree(root / "date=2026-11-21")
    damaged(scored, root / "date=2026-11-21", "status")
    with pytest.raises(InputError, match=r"date=2026-11-21' is not complete: its _manifest.json says \"status\": \"incomplete\""):
        drift_job.main([f"root={root}"])
    (root / "date=2026-11-22").mkdir()  # a first run still being written: no manifest yet
    with pytest.raises(InputError, match=r"date=2026-11-2[12]' is not complete"):
        drift_job.main([f"root={root}"])
    assert not (root / "_drift").exists()

    with caplog.at_level("WARNING", logger="pipelines.sink.completion"):
        summary = drift_job.main([f"root={root}", "allow_incomplete=true"])
    assert summary["partitions"] == ["2026-11-20", "2026-11-21"]  # the one without a manifest has nothing to read
    assert [(p["partition"], p["problems"][0].split(" (")[0]) for p in summary["incomplete_partitions"]] == [
        ("2026-11-21", 'its _manifest.json says "status": "incomplete"'), ("2026-11-22", "no _manifest.json")]
    assert "reading it anyway (allow_incomplete=true)" in caplog.text
    assert json.loads((root / "_drift" / "drift_summary.json").read_text())["incomplete_partitions"] == summary["incomplete_partitions"]
    # Complete partitions alone pass without the key.
    shutil.rmtree(root / "date=2026-11-21")
    (root / "date=2026-11-22").rmdir()
    assert drift_job.main([f"root={root}"])["incomplete_partitions"] == []
