import dataclasses
import json
import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn import metrics as skm
from transformers import AutoTokenizer

import mtcls
from jobs import evaluate as evaluate_job
from mtcls import HeadSpec, encode_labels
from mtcls.calibration import expected_calibration_error
from mtcls.inference import InferenceEngine
from pipelines.config import ConfigError
from pipelines.evaluate.report import plot_reliability, report_markdown
from pipelines.evaluate.statistics import NO_TEMPERATURE, NO_UNCALIBRATED, block_statistics, build_report, merge_block_statistics
from pipelines.sink.schema import output_schema
from tests.conftest import ALL_KIND_HEADS, tiny_model

SPECS = [HeadSpec.from_dict(h) for h in ALL_KIND_HEADS]
BY = {s.name: s for s in SPECS}


def random_rows(n, seed=0):
    """Predictions (in the scoring output layout) and labels (names) for every head kind."""
    rng = np.random.default_rng(seed)
    ids = [f"id{i:05d}" for i in range(n)]
    probs = {
        "trust": rng.random((n, 1)),
        "type": rng.dirichlet(np.ones(3), n),
        "tags": rng.random((n, 3)),
        "topic": rng.dirichlet(np.ones(4), (n, 2)),
        "sphere": rng.dirichlet(np.ones(3), n),
    }
    labels = {
        "trust": [None if rng.random() < 0.1 else BY["trust"].labels[rng.integers(2)] for _ in range(n)],
        "type": [BY["type"].labels[rng.integers(3)] for _ in range(n)],
        "tags": [[l for l in BY["tags"].labels if rng.random() < 0.4] for _ in range(n)],
        "topic": [{g: BY["topic"].labels[rng.integers(4)] for g in BY["topic"].groups} for _ in range(n)],
        "sphere": [list(rng.dirichlet(np.ones(3))) for _ in range(n)],
    }
    labels["type"][3] = "sports"  # outside the label set: counted, not crashed on
    return ids, probs, labels


def write_predictions(path, ids, probs, shards):
    cols = {"id": ids}
    for spec in SPECS:
        cols.update(mtcls.decode(spec, probs[spec.name]))
    cols["truncated"] = [False] * len(ids)
    cols["error"] = [None] * len(ids)
    schema = output_schema(SPECS, pa.schema([("id", pa.string())]), {"uri": "test-model"}, ["text"])
    table = pa.Table.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)
    path.mkdir()
    for k, part in enumerate(np.array_split(np.arange(len(ids)), shards)):
        pq.write_table(table.take(part), path / f"part-{k:03d}.parquet")
    (path / "_manifest.json").write_text(json.dumps({"status": "complete"}))  # complete, as jobs.score leaves it
    (path / "_SUCCESS").write_text("")


def write_labels(path, ids, labels, extra=None):
    cols = {"id": ids, **labels, **(extra or {})}
    pq.write_table(pa.table(cols), path)


def run_eval(tmp_path, *args):
    return evaluate_job.main([f"output={tmp_path / 'report'}", "progress=false", *args])


@pytest.mark.parametrize("shards", [pytest.param(1, marks=pytest.mark.slow), 6])  # one block; more files than partitions (joined in 4)
def test_join_path_equals_sklearn_for_every_kind_and_shard_count(tmp_path, ray_local, shards, monkeypatch, caplog):
    import pipelines.evaluate.run as evaluate_run

    monkeypatch.setattr(evaluate_run, "JOIN_ROWS_PER_PARTITION", 100 if shards > 1 else 10**6)
    n = 400
    ids, probs, labels = random_rows(n, seed=shards)
    write_predictions(tmp_path / "preds", ids, probs, shards)
    write_labels(tmp_path / "labels.parquet", ids, labels)
    with caplog.at_level(logging.INFO, logger="pipelines.evaluate.run"):
        report = run_eval(tmp_path, f"predictions={tmp_path / 'preds'}", f"labels={tmp_path / 'labels.parquet'}")
    lines = [r.getMessage() for r in caplog.records if r.name == "pipelines.evaluate.run"]
    assert any(f"({shards} files, {n} rows) joined to the labels" in line for line in lines), lines
    assert re.fullmatch(r"evaluate: prediction rows 400/400 done, [\d,.]+ prediction rows/s, in \S+, 0 error rows",
                        lines[-1]), lines

    trust = report["heads"]["trust"]
    ok = [i for i in range(n) if labels["trust"][i] is not None]
    y = [BY["trust"].labels.index(labels["trust"][i]) for i in ok]
    pred = (probs["trust"][ok, 0] >= 0.5).astype(int)
    assert trust["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=[0, 1]).tolist()
    assert trust["macro_f1"] == skm.f1_score(y, pred, average="macro")
    assert trust["rows_unlabelled"] == n - len(ok)

    typ = report["heads"]["type"]
    ok = [i for i in range(n) if labels["type"][i] in BY["type"].labels]
    y = [BY["type"].labels.index(labels["type"][i]) for i in ok]
    assert typ["rows_invalid"] == 1
    assert typ["macro_f1"] == skm.f1_score(y, probs["type"][ok].argmax(1), average="macro")
    assert typ["weighted"]["f1"] == pytest.approx(skm.f1_score(y, probs["type"][ok].argmax(1), average="weighted"), rel=1e-12)

    t = np.array([[int(l in row) for l in BY["tags"].labels] for row in labels["tags"]])
    p = (probs["tags"] >= np.array([0.3, 0.5, 0.7])).astype(int)
    tags = report["heads"]["tags"]
    assert tags["subset_accuracy"] == skm.accuracy_score(t, p)
    assert tags["micro"]["f1"] == pytest.approx(skm.f1_score(t, p, average="micro"), rel=1e-12)
    assert tags["hamming_loss"] == pytest.approx(skm.hamming_loss(t, p), rel=1e-12)

    y = np.array([[BY["topic"].labels.index(row[g]) for g in BY["topic"].groups] for row in labels["topic"]])
    topic = report["heads"]["topic"]
    for g, group in enumerate(BY["topic"].groups):
        assert topic["groups"][group]["accuracy"] == skm.accuracy_score(y[:, g], probs["topic"][:, g].argmax(1))
    assert topic["overall"]["confusion_matrix"] == skm.confusion_matrix(y.ravel(), probs["topic"].argmax(-1).ravel(), labels=[0, 1, 2, 3]).tolist()

    target = np.array(labels["sphere"])
    sphere = report["heads"]["sphere"]
    assert sphere["top1_accuracy"] == skm.accuracy_score(target.argmax(1), probs["sphere"].argmax(1))
    kl = np.mean(np.sum(target * np.log(target / probs["sphere"].astype(np.float32).astype(np.float64)), axis=1))
    assert sphere["kl_divergence"] == pytest.approx(kl, rel=1e-5)
    assert report["join"] == {"predictions_without_labels": 0, "labels_without_predictions": 0, "matched": n}

    # Calibration of the table's scores (float32 in the table), summed over the shards' blocks.
    assert set(report["calibration"]) == {"trust", "type", "tags", "topic"}  # distribution heads are not calibrated
    for name, cal in report["calibration"].items():
        direct = expected_calibration_error(BY[name], probs[name].astype(np.float32), encode_labels(BY[name], labels[name], on_unknown="mark"))
        assert cal["ece"] == pytest.approx(direct, rel=1e-9)
        assert cal["ece_without_temperature"] is None and cal["note"] == NO_TEMPERATURE


def test_unmatched_rows_errors_slices_and_pngs(tmp_path, ray_local):
    ids, probs, labels = random_rows(120, seed=3)
    write_predictions(tmp_path / "preds", ids[:100], {k: v[:100] for k, v in probs.items()}, 3)
    source = ["web" if i % 3 else "app" for i in range(120)]
    write_labels(tmp_path / "labels.parquet", ids[20:], {k: v[20:] for k, v in labels.items()}, {"source": source[20:]})
    report = run_eval(tmp_path, f"predictions={tmp_path / 'preds'}", f"labels={tmp_path / 'labels.parquet'}", "slice_by=[source]")
    assert report["join"] == {"predictions_without_labels": 20, "labels_without_predictions": 20, "matched": 80}
    assert report["rows"] == 80
    web = [i for i in range(20, 100) if source[i] == "web"]
    y = [BY["type"].labels.index(labels["type"][i]) for i in web]
    assert report["slices"]["source"]["web"]["type"]["accuracy"] == skm.accuracy_score(y, probs["type"][web].argmax(1))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Slices by source" in md and "| Actual ok | " in md and "80 matched, 20 predictions without labels" in md
    for spec in SPECS:
        img = Image.open(tmp_path / "report" / f"{spec.name}_confusion.png").convert("L")
        assert img.size[0] >= 600 and img.size[1] >= 300
        assert np.asarray(img).std() > 10  # not blank
    for name in ("trust", "type", "tags", "topic"):
        assert np.asarray(Image.open(tmp_path / "report" / f"{name}_reliability.png").convert("L")).std() > 10
    assert not (tmp_path / "report" / "sphere_reliability.png").exists()
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(saved["threshold_tuning"]) == {"trust", "tags"}
    assert "## Calibration" in md and "| type | no temperature |" in md


def calibrated_copy(model_dir, path):
    """The tiny model with temperatures on four heads (the distribution head "sphere" has none)."""
    model = mtcls.MultiTaskModel.from_pretrained(model_dir)
    for name, t in TEMPERATURES.items():
        model.set_head_spec(dataclasses.replace(model.specs[name], temperature=t))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    return path


TEMPERATURES = {"trust": 0.25, "type": 0.2, "tags": 0.3}  # "topic" keeps none: its ECE is reported once


def test_data_path_equals_direct_predictions_measures_calibration_and_saves_tuned_thresholds(tmp_path, ray_local, tiny_model_dir,
                                                                                             caplog):
    ids, _, labels = random_rows(90, seed=5)
    texts = [f"review number {i} " + "word " * (i % 17) for i in range(90)]
    texts[4] = "   "  # not scorable: counted, not crashed on
    write_labels(tmp_path / "data.parquet", ids, labels, {"text": texts})
    model_dir = calibrated_copy(tiny_model_dir, tmp_path / "calibrated")
    with caplog.at_level(logging.INFO, logger="pipelines.evaluate.run"):
        report = run_eval(tmp_path, f"data={tmp_path / 'data.parquet'}", f"model={model_dir}", "block_rows=16",
                          "precision=fp32", f"save_tuned_model={tmp_path / 'tuned'}")
    assert report["rows_unscored"] == 1
    # The start summary and the progress line's last state, fed per scored block.
    lines = [r.getMessage() for r in caplog.records if r.name == "pipelines.evaluate.run"]
    assert any(line.startswith("evaluate ") and "(1 files, 90 rows), heads trust, type, tags, topic, sphere" in line
               for line in lines), lines
    assert re.fullmatch(r"evaluate: rows 90/90 done, [\d,.]+ rows/s, in \S+, 1 error rows", lines[-1]), lines
    model = mtcls.MultiTaskModel.from_pretrained(model_dir)
    keep = [i for i in range(90) if i != 4 and labels["type"][i] in BY["type"].labels]
    cols = mtcls.predict_texts(model, AutoTokenizer.from_pretrained(model_dir), [texts[i] for i in keep])
    y = [labels["type"][i] for i in keep]
    assert report["heads"]["type"]["accuracy"] == skm.accuracy_score(y, cols["type_label"])
    tuned = mtcls.MultiTaskConfig.from_pretrained(tmp_path / "tuned").head("tags")
    assert tuned.thresholds == report["threshold_tuning"]["tags"]["thresholds"]

    # ECE with and without the temperature, from 6 blocks, equals the ECE of all scored rows at once.
    scored = [i for i in range(90) if i != 4]
    engine = InferenceEngine(model, AutoTokenizer.from_pretrained(model_dir), "fp32", with_uncalibrated=True)
    out = engine.predict_tokens(engine.tokenize([texts[i] for i in scored]))
    probs = out.probs
    cal = report["calibration"]
    for name, spec in model.specs.items():
        if name == "sphere":
            assert name not in cal and not (tmp_path / "report" / f"{name}_reliability.png").exists()
            continue
        y = encode_labels(spec, [labels[name][i] for i in scored], on_unknown="mark")
        assert cal[name]["temperature"] == TEMPERATURES.get(name)
        assert cal[name]["ece"] == pytest.approx(expected_calibration_error(spec, probs[name], y), abs=1e-6)
        if name in TEMPERATURES:
            without = expected_calibration_error(spec, out.uncalibrated[name], y)
            assert cal[name]["ece_without_temperature"] == pytest.approx(without, abs=1e-6)
            assert abs(cal[name]["ece"] - without) > 0.01
        else:
            assert cal[name]["ece_without_temperature"] is None and cal[name]["note"] == NO_TEMPERATURE
        assert (tmp_path / "report" / f"{name}_reliability.png").stat().st_size > 10_000
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"| type | 0.2 | {cal['type']['ece']:.4f} | {cal['type']['ece_without_temperature']:.4f} | `type_reliability.png` |" in md


def test_bad_evaluation_configs(tmp_path, ray_local, tiny_model_dir):
    ids, _, labels = random_rows(10)
    write_labels(tmp_path / "data.parquet", ids, labels, {"text": ["x"] * 10})
    with pytest.raises(ConfigError, match=r"'label_columns': \['nope'\] are not heads of the model"):
        run_eval(tmp_path, f"data={tmp_path / 'data.parquet'}", f"model={tiny_model_dir}", "label_columns.nope=type")
    with pytest.raises(ConfigError, match="key 'labels': required with 'predictions'"):
        run_eval(tmp_path, f"predictions={tmp_path}")
    with pytest.raises(ConfigError, match="give one source"):
        run_eval(tmp_path, f"predictions={tmp_path}", f"data={tmp_path}", "labels=x")


def test_reliability_statistics_of_blocks_merge_into_the_ece_of_all_rows(tmp_path, tokenizer):
    model = tiny_model()
    for name, t in TEMPERATURES.items():
        model.set_head_spec(dataclasses.replace(model.specs[name], temperature=t))
    specs = list(model.specs.values())
    ids, _, labels = random_rows(120, seed=11)
    engine = InferenceEngine(model, tokenizer, "fp32", with_uncalibrated=True)
    out = engine.predict_tokens(engine.tokenize([f"text {i} " + "w " * (i % 9) for i in range(120)]))
    probs = dict(out.probs)
    # The engine's uncalibrated scores are the heads' probabilities without the temperature (one forward pass).
    plain, _ = InferenceEngine(tiny_model(), tokenizer, "fp32").predict([f"text {i} " + "w " * (i % 9) for i in range(120)])
    assert set(probs) == {s.name for s in specs} and set(out.uncalibrated) == set(TEMPERATURES)
    uncalibrated = dict(out.uncalibrated)
    for name in TEMPERATURES:
        np.testing.assert_allclose(uncalibrated[name], plain[name], atol=1e-6)
        assert not np.allclose(probs[name], plain[name], atol=1e-3)

    table = pa.table(labels)
    columns = {s.name: s.name for s in specs}
    parts = np.array_split(np.random.default_rng(0).permutation(120), 5)  # uneven blocks, rows out of order
    ones = lambda k: np.ones(len(k), bool)  # noqa: E731
    blocks = [json.loads(json.dumps(block_statistics(table.take(k), specs, columns, {n: p[k] for n, p in probs.items()}, ones(k), [], 20,
                                                     {n: p[k] for n, p in uncalibrated.items()}))) for k in parts]
    report = build_report(specs, merge_block_statistics(specs, blocks), columns, tune=False)
    cal = report["calibration"]
    assert set(cal) == {"trust", "type", "tags", "topic"}
    for spec in specs[:4]:
        y = encode_labels(spec, labels[spec.name], on_unknown="mark")
        assert cal[spec.name]["ece"] == pytest.approx(expected_calibration_error(spec, probs[spec.name], y), rel=1e-12)
        if spec.name in TEMPERATURES:
            direct = expected_calibration_error(spec, uncalibrated[spec.name], y)
            assert cal[spec.name]["ece_without_temperature"] == pytest.approx(direct, rel=1e-12)
            assert abs(cal[spec.name]["ece"] - direct) > 0.01
            assert sum(cal[spec.name]["reliability_without_temperature"]["count"]) == sum(cal[spec.name]["reliability"]["count"])
    n_type = sum(1 for v in labels["type"] if v in BY["type"].labels)
    assert sum(cal["type"]["reliability"]["count"]) == n_type  # one top-label entry per labelled row
    assert sum(cal["tags"]["reliability"]["count"]) == 120 * 3  # one entry per label of every row

    # A scored table holds only calibrated scores: the ECE without the temperature is not claimed.
    joined = [json.loads(json.dumps(block_statistics(table.take(k), specs, columns, {n: p[k] for n, p in probs.items()}, ones(k), [], 20)))
              for k in parts]
    table_cal = build_report(specs, merge_block_statistics(specs, joined), columns, tune=False)["calibration"]
    assert table_cal["type"]["ece"] == cal["type"]["ece"]
    assert table_cal["type"]["ece_without_temperature"] is None and table_cal["type"]["note"] == NO_UNCALIBRATED
    assert table_cal["topic"]["note"] == NO_TEMPERATURE

    md = report_markdown({**report, "model": {"uri": "m"}})
    assert "| topic | no temperature |" in md and "| trust | 0.25 |" in md
    plot_reliability("type", cal["type"], str(tmp_path / "type.png"))
    img = np.asarray(Image.open(tmp_path / "type.png").convert("L"))
    assert img.shape[0] >= 600 and img.std() > 10
