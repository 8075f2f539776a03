"""The README's first command, scaled down: generate, train, score, evaluate, summarise."""

import json

import pytest


@pytest.mark.slow
def test_demo_runs_the_whole_flow(tmp_path, monkeypatch, ray_local, capsys):
    from jobs import demo

    monkeypatch.setenv("MTCLS_CACHE", str(tmp_path / "cache"))
    summary = demo.main([f"output={tmp_path / 'demo'}", "rows=300", "epochs=1", "progress=false"])
    assert summary["rows_scored"] == 300
    assert set(summary["test_macro_f1"]) == {"spam", "sentiment", "aspects", "aspect_sentiment"}
    # The summary reports what the evaluation job wrote, for the model the training job exported.
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert summary["test_macro_f1"] == {h: round(r["macro_f1"], 4) for h, r in report["heads"].items()}
    assert report["join"] == {"predictions_without_labels": 0, "labels_without_predictions": 0, "matched": 300}
    assert (tmp_path / "demo" / "model" / "model.safetensors").exists()
    assert (tmp_path / "demo" / "predictions" / "_SUCCESS").exists()
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.rindex('{\n  "model"'):])["rows_scored"] == 300
