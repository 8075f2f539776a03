"""Adding a head kind is one class and its registration: nothing else in the project changes."""

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

import mtcls
from mtcls import HeadSpec, get_kind, register_kind
from tests.conftest import tiny_model
from mtcls.kinds import unregister_kind
from mtcls.kinds.multiclass import Multiclass


class SmoothedMulticlass(Multiclass):
    """A test-only kind: multiclass with label smoothing 0.2 in its loss."""

    name = "smoothed"

    def loss_parts(self, spec, logits, labels, weights):
        y = labels.long().reshape(-1)
        ok = y != mtcls.IGNORE_INDEX
        total = F.cross_entropy(logits.float()[ok], y[ok], label_smoothing=0.2, reduction="sum")
        return total.reshape(1), ok.sum().float().reshape(1)


@pytest.fixture
def smoothed():
    register_kind(SmoothedMulticlass)
    yield get_kind("smoothed")
    unregister_kind("smoothed")


def test_a_kind_defined_here_works_through_model_metrics_and_pipelines(smoothed):
    from pipelines.evaluate.statistics import block_statistics, build_report, merge_block_statistics
    from pipelines.sink.schema import output_schema

    spec = HeadSpec.from_dict({"name": "mood", "kind": "smoothed", "labels": ["sad", "ok", "glad"], "class_weights": "balanced"})
    assert spec.impl is smoothed and spec.num_logits == 3
    with pytest.raises(mtcls.HeadSpecError, match="'pos_weight': applies to binary and multilabel"):
        HeadSpec.from_dict({"name": "m", "kind": "smoothed", "labels": ["a", "b"], "pos_weight": 2.0})

    model = tiny_model([{"name": "tags", "kind": "multilabel", "labels": ["x", "y"]},
                        {**spec.to_dict(), "class_weights": None, "inputs_from": ["tags"]}])
    y = torch.tensor([0, 2, mtcls.IGNORE_INDEX, 1])
    out = model(input_ids=torch.randint(5, 100, (4, 7)), labels={"mood": y})
    logits = out.logits["mood"]
    plain = F.cross_entropy(logits[y >= 0], y[y >= 0])
    smoothed_loss = F.cross_entropy(logits[y >= 0], y[y >= 0], label_smoothing=0.2)
    torch.testing.assert_close(out.head_losses["mood"], smoothed_loss)
    assert not torch.allclose(out.head_losses["mood"], plain)

    probs = out.logits["mood"].softmax(-1).detach().numpy()
    columns = mtcls.decode_arrow(model.specs["mood"], probs)
    assert list(columns) == ["mood_label", "mood_score", "mood_probs"]
    labels = mtcls.encode_labels(model.specs["mood"], ["sad", "glad", None, "nope"], on_unknown="mark")
    stats = mtcls.head_statistics(model.specs["mood"], labels, probs)
    report = mtcls.head_report(model.specs["mood"], stats)
    assert report["kind"] == "smoothed" and report["rows_labelled"] == 2 and report["rows_invalid"] == 1

    schema = output_schema(list(model.specs.values()), pa.schema([("id", pa.string())]), {"uri": "m"}, ["text"])
    assert {"mood_label", "mood_score", "mood_probs"} <= set(schema.names)
    batch = pa.table({"mood": ["sad", "glad", None, "ok"]})
    block = block_statistics(batch, [model.specs["mood"]], {"mood": "mood"}, {"mood": probs}, np.ones(4, bool), [], 10)
    totals = merge_block_statistics([model.specs["mood"]], [block])
    built = build_report([model.specs["mood"]], totals, {"mood": "mood"}, tune=True)
    assert built["heads"]["mood"]["rows_labelled"] == 3 and "mood" not in built["threshold_tuning"]


def test_a_kind_name_cannot_be_registered_twice_by_different_classes(smoothed):
    class Other(Multiclass):
        name = "smoothed"

    with pytest.raises(ValueError, match="already registered"):
        register_kind(Other)
    with pytest.raises(KeyError, match="unknown head kind 'nope'"):
        get_kind("nope")
