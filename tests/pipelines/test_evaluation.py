import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn import metrics as skm
from transformers import AutoTokenizer

import mtcls
from jobs import evaluate as evaluate_job
from mtcls import HeadSpec
from pipelines.config import ConfigError
from pipelines.score.schema import output_schema
from tests.conftest import ALL_KIND_HEADS

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


def write_labels(path, ids, labels, extra=None):
    cols = {"id": ids, **labels, **(extra or {})}
    pq.write_table(pa.table(cols), path)


def run_eval(tmp_path, *args):
    return evaluate_job.main([f"output={tmp_path / 'report'}", "progress=false", *args])


@pytest.mark.parametrize("shards", [1, 7, 50])
def test_join_path_equals_sklearn_for_every_kind_and_shard_count(tmp_path, ray_local, shards):
    n = 400
    ids, probs, labels = random_rows(n, seed=shards)
    write_predictions(tmp_path / "preds", ids, probs, shards)
    write_labels(tmp_path / "labels.parquet", ids, labels)
    report = run_eval(tmp_path, f"predictions={tmp_path / 'preds'}", f"labels={tmp_path / 'labels.parquet'}")

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
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(saved["threshold_tuning"]) == {"trust", "tags"}


def test_data_path_equals_direct_predictions_and_saves_tuned_thresholds(tmp_path, ray_local, tiny_model_dir):
    ids, _, labels = random_rows(90, seed=5)
    texts = [f"review number {i} " + "word " * (i % 17) for i in range(90)]
    texts[4] = "   "  # not scorable: counted, not crashed on
    write_labels(tmp_path / "data.parquet", ids, labels, {"text": texts})
    report = run_eval(tmp_path, f"data={tmp_path / 'data.parquet'}", f"model={tiny_model_dir}", "block_rows=16", "precision=fp32",
                      f"save_tuned_model={tmp_path / 'tuned'}")
    assert report["rows_unscored"] == 1
    model = mtcls.MultiTaskModel.from_pretrained(tiny_model_dir)
    keep = [i for i in range(90) if i != 4 and labels["type"][i] in BY["type"].labels]
    cols = mtcls.predict_texts(model, AutoTokenizer.from_pretrained(tiny_model_dir), [texts[i] for i in keep])
    y = [labels["type"][i] for i in keep]
    assert report["heads"]["type"]["accuracy"] == skm.accuracy_score(y, cols["type_label"])
    tuned = mtcls.MultiTaskConfig.from_pretrained(tmp_path / "tuned").head("tags")
    assert tuned.thresholds == report["threshold_tuning"]["tags"]["thresholds"]


def test_bad_evaluation_configs(tmp_path, ray_local, tiny_model_dir):
    ids, _, labels = random_rows(10)
    write_labels(tmp_path / "data.parquet", ids, labels, {"text": ["x"] * 10})
    with pytest.raises(ConfigError, match=r"'label_columns': \['nope'\] are not heads of the model"):
        run_eval(tmp_path, f"data={tmp_path / 'data.parquet'}", f"model={tiny_model_dir}", "label_columns.nope=type")
    with pytest.raises(ConfigError, match="key 'labels': required with 'predictions'"):
        run_eval(tmp_path, f"predictions={tmp_path}")
    with pytest.raises(ConfigError, match="give one source"):
        run_eval(tmp_path, f"predictions={tmp_path}", f"data={tmp_path}", "labels=x")
