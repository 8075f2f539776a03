import numpy as np
import pytest
from sklearn.metrics import f1_score

from mtcls import HeadSpec
from mtcls.thresholds import best_thresholds, threshold_histograms


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
    assert result["f1"][0] >= result["current_f1"][0]
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
    with pytest.raises(ValueError, match="binary and multilabel"):
        threshold_histograms(HeadSpec.from_dict({"name": "m", "kind": "multiclass", "labels": ["a", "b"]}), y, p)
