import numpy as np
import pytest
from sklearn import metrics as skm

from mtcls import HeadSpec, head_report, head_statistics, merge_statistics
from mtcls.metrics import empty_statistics, statistics_from_lists, statistics_to_lists
from tests.conftest import ALL_KIND_HEADS

SPECS = {h["name"]: HeadSpec.from_dict(h) for h in ALL_KIND_HEADS}


def random_case(spec, n, seed):
    """Random labels (with missing ones) and probabilities for one head."""
    rng = np.random.default_rng(seed)
    k = spec.num_labels
    if spec.kind == "binary":
        return rng.integers(0, 2, n), rng.random((n, 1))
    if spec.kind == "multiclass":
        y = rng.integers(0, k, n)
        y[rng.random(n) < 0.1] = -100
        return y, rng.dirichlet(np.ones(k), n)
    if spec.kind == "multilabel":
        y = (rng.random((n, k)) < 0.4).astype(np.float32)
        y[rng.random(n) < 0.1] = -100
        return y, rng.random((n, k))
    if spec.kind == "grouped":
        y = rng.integers(0, k, (n, spec.num_groups))
        y[rng.random((n, spec.num_groups)) < 0.2] = -100
        return y, rng.dirichlet(np.ones(k), (n, spec.num_groups))
    return rng.dirichlet(np.ones(k), n).astype(np.float32), rng.dirichlet(np.ones(k), n)


def check_against_sklearn(report, y_true, y_pred, labels):
    assert report["accuracy"] == skm.accuracy_score(y_true, y_pred)
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, name in enumerate(report["per_label"]):
        row = report["per_label"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == (p[i], r[i], f[i], s[i])
    for avg in ("macro", "micro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        assert report[avg] == pytest.approx({"precision": p, "recall": r, "f1": f}, rel=1e-12, abs=1e-15), avg
    np.testing.assert_array_equal(report["confusion_matrix"], skm.confusion_matrix(y_true, y_pred, labels=labels))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", ["trust", "type"])
def test_single_label_reports_equal_sklearn(name, seed):
    spec = SPECS[name]
    y, probs = random_case(spec, 500, seed)
    report = head_report(spec, head_statistics(spec, y, probs))
    pred = (probs[:, 0] >= 0.5).astype(int) if spec.kind == "binary" else probs.argmax(1)
    ok = y >= 0
    check_against_sklearn(report, y[ok], pred[ok], list(range(spec.num_labels)))
    assert report["rows_unlabelled"] == int((~ok).sum())
    assert report["macro_f1"] == report["macro"]["f1"]


@pytest.mark.parametrize("seed", range(3))
def test_multilabel_report_equals_sklearn(seed):
    spec = SPECS["tags"]
    y, probs = random_case(spec, 400, seed)
    report = head_report(spec, head_statistics(spec, y, probs))
    ok = (y >= 0).all(1)
    t, p = y[ok].astype(int), (probs[ok] >= np.array([0.3, 0.5, 0.7])).astype(int)
    assert report["subset_accuracy"] == skm.accuracy_score(t, p)
    assert report["hamming_loss"] == pytest.approx(skm.hamming_loss(t, p), rel=1e-12)
    for avg in ("macro", "micro", "weighted"):
        assert report[avg]["f1"] == pytest.approx(skm.f1_score(t, p, average=avg, zero_division=0), rel=1e-12)
    f = skm.f1_score(t, p, average=None, zero_division=0)
    assert [report["per_label"][n]["f1"] for n in spec.labels] == list(f)
    assert report["rows_labelled"] + report["rows_unlabelled"] == 400


def test_grouped_report_per_group_and_overall_equal_sklearn():
    spec = SPECS["topic"]
    y, probs = random_case(spec, 600, 5)
    report = head_report(spec, head_statistics(spec, y, probs))
    pred = probs.argmax(-1)
    labels = list(range(spec.num_labels))
    for g, group in enumerate(spec.groups):
        ok = y[:, g] >= 0
        check_against_sklearn(report["groups"][group], y[ok, g], pred[ok, g], labels)
        assert report["rows_unlabelled"][group] == int((~ok).sum())
    ok = y >= 0
    check_against_sklearn(report["overall"], y[ok], pred[ok], labels)
    assert report["macro_f1"] == report["overall"]["macro"]["f1"]


def test_distribution_report():
    spec = SPECS["sphere"]
    t, p = random_case(spec, 300, 2)
    report = head_report(spec, head_statistics(spec, t, p))
    kl = np.mean(np.sum(np.where(t > 0, t * np.log(t / p), 0.0), axis=1))
    assert report["kl_divergence"] == pytest.approx(kl, rel=1e-6)
    assert report["top1_accuracy"] == skm.accuracy_score(t.argmax(1), p.argmax(1))
    order = np.argsort(-p, 1)
    cum = np.cumsum(np.take_along_axis(p, order, 1), 1)
    sizes = (cum < 0.8 - 1e-6).sum(1) + 1
    assert report["mean_set_size"] == pytest.approx(sizes.mean())
    covered = [t[i].argmax() in order[i, : sizes[i]] for i in range(300)]
    assert report["set_coverage"] == pytest.approx(np.mean(covered))


@pytest.mark.parametrize("shards", [1, 7, 50])
@pytest.mark.parametrize("name", list(SPECS))
def test_merged_shard_statistics_equal_the_whole(name, shards):
    spec = SPECS[name]
    y, probs = random_case(spec, 700, 11)
    whole = head_statistics(spec, y, probs)
    merged = empty_statistics(spec)
    for part in np.array_split(np.arange(700), shards):
        merged = merge_statistics(merged, head_statistics(spec, y[part], probs[part]))
    for key in whole:
        if whole[key].dtype.kind == "f":
            assert merged[key] == pytest.approx(whole[key], rel=1e-12)
        else:
            np.testing.assert_array_equal(merged[key], whole[key])
    rebuilt = statistics_from_lists(spec, statistics_to_lists(merged))
    assert head_report(spec, rebuilt)["macro_f1"] == head_report(spec, whole)["macro_f1"]


def test_invalid_labels_are_counted_not_scored():
    spec = SPECS["type"]
    y = np.array([0, 1, -1, -100, 2])
    stats = head_statistics(spec, y, np.eye(3)[[0, 1, 1, 1, 2]])
    report = head_report(spec, stats)
    assert (report["rows_labelled"], report["rows_invalid"], report["rows_unlabelled"]) == (3, 1, 1)
    assert report["accuracy"] == 1.0
