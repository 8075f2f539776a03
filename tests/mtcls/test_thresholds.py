import numpy as np
import pytest
from sklearn.metrics import f1_score

from mtcls import HeadSpec
from mtcls.thresholds import best_thresholds, threshold_histograms

EPS = 1e-12  # float slack only: tuning may never lose F1


def f1_at_edge(hist: dict, j: int, edge: int) -> float:
    """F1 of label ``j`` predicting positive for every bin from ``edge`` up, straight from the counts."""
    tp, fp = hist["pos"][j, edge:].sum(), hist["neg"][j, edge:].sum()
    fn = hist["pos"][j, :edge].sum()
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


@pytest.mark.parametrize("bins", [10, 100, 200])
@pytest.mark.parametrize("seed", range(4))
def test_tuned_f1_is_never_below_the_f1_at_the_present_thresholds(seed, bins):
    present = [0.3, 0.5, 0.8]  # on the grid of every bin count above
    spec = HeadSpec.from_dict({"name": "tags", "kind": "multilabel", "labels": ["a", "b", "c"], "thresholds": present})
    rng = np.random.default_rng(seed)
    y = (rng.random((400, 3)) < [0.05, 0.3, 0.6]).astype(np.float32)
    y[:, 0] = np.maximum(y[:, 0], np.arange(400) < 3)  # at least a few positives everywhere
    p = np.clip(y * rng.random(3) * 0.5 + rng.random((400, 3)) * 0.6, 0, 0.999)
    hist = threshold_histograms(spec, y, p, bins=bins)
    result = best_thresholds(spec, hist)
    for j, t in enumerate(present):
        current = f1_at_edge(hist, j, round(t * bins))
        assert current == pytest.approx(f1_score(y[:, j], p[:, j] >= t), abs=EPS)
        assert result["current_f1"][j] == pytest.approx(current, abs=EPS)
        assert result["f1"][j] >= current - EPS, f"label {j}: tuning lost F1 ({result['f1'][j]} < {current})"
        assert result["f1"][j] == pytest.approx(max(f1_at_edge(hist, j, e) for e in range(1, bins)), abs=EPS)


@pytest.mark.parametrize("kind", ["binary", "multilabel"])
def test_separable_scores_get_f1_one_at_a_threshold_in_the_gap(kind):
    rng = np.random.default_rng(1)
    y = (np.arange(300) % 3 == 0).astype(np.float32)
    p = np.where(y > 0, rng.uniform(0.6, 0.98, 300), rng.uniform(0.02, 0.3, 300))
    labels = ["neg", "pos"] if kind == "binary" else ["pos"]
    spec = HeadSpec.from_dict({"name": "h", "kind": kind, "labels": labels, "thresholds": 0.9 if kind == "binary" else [0.9]})
    result = best_thresholds(spec, threshold_histograms(spec, y if kind == "binary" else y[:, None], p[:, None], bins=100))
    (t,), (f1,) = result["thresholds"], result["f1"]
    assert f1 == 1.0 and p[y == 0].max() < t <= p[y > 0].min()
    assert f1_score(y, p >= t) == 1.0
    assert result["current_f1"][0] < 1.0  # 0.9 missed positives: there was something to tune


def test_a_narrow_gap_is_found_only_when_the_bins_resolve_it():
    y = np.array([0, 0, 0, 1, 1, 1], dtype=np.float32)[:, None]
    p = np.array([0.05, 0.2, 0.3049, 0.3051, 0.5, 0.9])[:, None]
    spec = HeadSpec.from_dict({"name": "h", "kind": "multilabel", "labels": ["pos"]})
    fine = best_thresholds(spec, threshold_histograms(spec, y, p, bins=1000))
    assert fine["f1"] == [1.0] and 0.3049 < fine["thresholds"][0] <= 0.3051
    # At 100 bins 0.3049 and 0.3051 share a bin: the best edge either keeps the negative (F1 6/7)
    # or drops the positive (F1 4/5).
    coarse = best_thresholds(spec, threshold_histograms(spec, y, p, bins=100))
    assert coarse["f1"][0] == pytest.approx(6 / 7, abs=EPS) and 0.2 < coarse["thresholds"][0] <= 0.3


def test_tuned_thresholds_reach_the_best_f1_on_the_grid_and_merge_over_shards():
    spec = HeadSpec.from_dict({"name": "tags", "kind": "multilabel", "labels": ["a", "b"]})
    rng = np.random.default_rng(0)
    y = (rng.random((1000, 2)) < [0.1, 0.5]).astype(np.float32)
    p = np.clip(y * 0.3 + rng.random((1000, 2)) * 0.7, 0, 0.999)
    whole = threshold_histograms(spec, y, p, bins=100)
    parts = [threshold_histograms(spec, y[s], p[s], bins=100) for s in np.array_split(np.arange(1000), 7)]
    merged = {k: sum(part[k] for part in parts) for k in whole}
    for k in whole:
        np.testing.assert_array_equal(merged[k], whole[k])
    result = best_thresholds(spec, merged)
    for j in range(2):
        t = result["thresholds"][j]
        # The reported F1 is exactly scikit-learn's at that threshold ...
        assert result["f1"][j] == pytest.approx(f1_score(y[:, j], p[:, j] >= t), abs=1e-12)
        # ... and no grid threshold does better.
        grid = max(f1_score(y[:, j], p[:, j] >= e) for e in np.arange(1, 100) / 100)
        assert result["f1"][j] == pytest.approx(grid, abs=1e-12)
    assert result["no_positives"] == []


def test_a_label_without_positives_keeps_its_threshold():
    # Every threshold gives F1 0 for "c"; picking the lowest would flag nearly every row as "c".
    spec = HeadSpec.from_dict({"name": "tags", "kind": "multilabel", "labels": ["a", "c"], "thresholds": [0.5, 0.7]})
    y = np.array([[1, 0], [0, 0], [1, 0]], dtype=np.float32)
    p = np.array([[0.9, 0.2], [0.1, 0.6], [0.8, 0.1]])
    result = best_thresholds(spec, threshold_histograms(spec, y, p, bins=10))
    assert result["no_positives"] == ["c"]
    assert result["thresholds"][1] == 0.7 and result["f1"][1] == 0.0
    assert 0.1 < result["thresholds"][0] <= 0.8 and result["f1"][0] == 1.0


def test_binary_head_tunes_one_threshold():
    spec = HeadSpec.from_dict({"name": "b", "kind": "binary", "labels": ["n", "p"]})
    y = np.array([0, 0, 1, 1, -100])
    p = np.array([[0.1], [0.35], [0.4], [0.9], [0.5]])
    result = best_thresholds(spec, threshold_histograms(spec, y, p, bins=20))
    assert result["labels"] == ["p"] and 0.35 < result["thresholds"][0] <= 0.4 and result["f1"][0] == 1.0
    with pytest.raises(ValueError, match=r"head 'm'.*multiclass"):
        threshold_histograms(HeadSpec.from_dict({"name": "m", "kind": "multiclass", "labels": ["a", "b"]}), y, p)
