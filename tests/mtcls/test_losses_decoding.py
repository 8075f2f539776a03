import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtcls import IGNORE_INDEX, HeadSpec, decode, head_loss, output_columns, predict_indices
from mtcls.decoding import cumulative_sets
from tests.conftest import ALL_KIND_HEADS

SPECS = {h["name"]: HeadSpec.from_dict(h) for h in ALL_KIND_HEADS}


def test_binary_loss_uses_pos_weight_and_ignores_missing():
    logits = torch.tensor([[0.3], [-1.2], [2.0]])
    y = torch.tensor([1.0, 0.0, IGNORE_INDEX])
    got = head_loss(SPECS["trust"], logits, y, pos_weight=torch.tensor([3.0]))
    p = torch.sigmoid(logits[:2, 0])
    manual = -(3.0 * torch.log(p[0]) + torch.log(1 - p[1])) / 2
    assert torch.allclose(got, manual)


def test_grouped_loss_is_the_mean_of_per_group_cross_entropies():
    logits = torch.randn(5, 2, 4)
    y = torch.tensor([[0, 1], [2, IGNORE_INDEX], [3, 3], [IGNORE_INDEX, 0], [1, 2]])
    per_group = [F.cross_entropy(logits[:, g], y[:, g], ignore_index=IGNORE_INDEX) for g in range(2)]
    assert torch.allclose(head_loss(SPECS["topic"], logits, y), torch.stack(per_group).mean())


def test_multilabel_loss_masks_single_entries():
    logits = torch.randn(3, 3)
    y = torch.tensor([[1.0, 0.0, IGNORE_INDEX], [0.0, 1.0, 1.0], [IGNORE_INDEX] * 3])
    mask = y != IGNORE_INDEX
    manual = F.binary_cross_entropy_with_logits(logits[mask], y[mask])
    assert torch.allclose(head_loss(SPECS["tags"], logits, y), manual)


def test_distribution_loss_is_kl_divergence_of_the_labelled_rows():
    logits = torch.randn(3, 3)
    t = torch.tensor([[0.7, 0.3, 0.0], [IGNORE_INDEX] * 3, [0.2, 0.2, 0.6]])
    p = torch.softmax(logits, -1)
    rows = [0, 2]
    manual = sum(sum(t[i, j] * torch.log(t[i, j] / p[i, j]) for j in range(3) if t[i, j] > 0) for i in rows) / 2
    assert torch.allclose(head_loss(SPECS["sphere"], logits, t), manual)


def test_multiclass_class_weights_match_torch():
    logits = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 2, IGNORE_INDEX, 1])
    w = torch.tensor([1.0, 2.0, 0.5])
    expected = F.cross_entropy(logits[y >= 0], y[y >= 0], weight=w)
    assert torch.allclose(head_loss(SPECS["type"], logits, y, class_weights=w), expected)


def test_binary_and_multilabel_thresholds():
    assert predict_indices(SPECS["trust"], np.array([[0.49], [0.5], [0.9]])).tolist() == [0, 1, 1]
    tight = HeadSpec.from_dict({**ALL_KIND_HEADS[0], "thresholds": 0.95})
    assert decode(tight, np.array([[0.9]]))["trust_label"] == ["ok"]
    probs = np.array([[0.35, 0.45, 0.75], [0.2, 0.6, 0.6]], dtype=np.float32)
    assert decode(SPECS["tags"], probs)["tags_labels"] == [["x", "z"], ["y"]]


def test_cumulative_set_is_the_smallest_reaching_the_threshold():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=200)
    order, sizes = cumulative_sets(probs, 0.8)
    for row, o, s in zip(probs, order, sizes):
        best = min(
            len(c) for r in range(1, 6) for c in itertools.combinations(range(5), r) if row[list(c)].sum() >= 0.8 - 1e-6
        )
        assert s == best
        assert row[o[:s]].sum() >= 0.8 - 1e-6
        assert list(row[o[:s]]) == sorted(row[o[:s]], reverse=True)
    out = decode(SPECS["sphere"], np.array([[0.5, 0.4, 0.1]], dtype=np.float32))
    assert out["sphere_set"] == [["cs", "math"]] and out["sphere_label"] == ["cs"]


@pytest.mark.parametrize("name", list(SPECS))
def test_decode_columns_follow_the_documented_layout(name):
    spec = SPECS[name]
    rng = np.random.default_rng(1)
    shape = (4, spec.num_groups, spec.num_labels) if spec.kind == "grouped" else (4, spec.num_logits)
    probs = rng.random(shape).astype(np.float32)
    if spec.kind in ("multiclass", "distribution", "grouped"):
        probs /= probs.sum(-1, keepdims=True)
    out = decode(spec, probs)
    assert list(out) == [c for c, _ in output_columns(spec)]
    for column, values in out.items():
        assert len(values) == 4, column
    if spec.kind == "grouped":
        assert out["topic_race_label"] == [spec.labels[i] for i in probs[:, 1].argmax(-1)]
        np.testing.assert_allclose(out["topic_economy_score"], probs[:, 0].max(-1))
    if spec.kind == "binary":
        np.testing.assert_allclose(np.array(out["trust_probs"]).sum(1), 1.0, rtol=1e-6)
