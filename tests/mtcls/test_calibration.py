"""Temperature scaling: fitting, ECE, the spec field, and where calibrated scores appear."""

import dataclasses

import numpy as np
import pytest
import torch

from mtcls import HeadSpec, HeadSpecError
from mtcls.calibration import (
    DEFAULT_MIN_GAIN,
    calibrate_spec,
    calibrated_probabilities,
    calibration_report,
    ece_from_reliability,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    negative_log_likelihood,
    reliability_curve,
    reliability_statistics,
    uncalibrate_spec,
)
from mtcls.inference import predict_probabilities
from mtcls.modeling import head_probabilities
from tests.conftest import ALL_KIND_HEADS, tiny_model

MULTICLASS = HeadSpec(name="m", kind="multiclass", labels=["a", "b", "c", "d"])
BINARY = HeadSpec(name="b", kind="binary", labels=["no", "yes"])
MULTILABEL = HeadSpec(name="ml", kind="multilabel", labels=["x", "y", "z"])
GROUPED = HeadSpec(name="g", kind="grouped", labels=["neg", "neu", "pos"], groups=["u", "v"])
DISTRIBUTION = HeadSpec(name="d", kind="distribution", labels=["a", "b", "c"])


def softmax_samples(rng, z, temperature):
    """One label per row (per group) drawn from softmax(z / temperature)."""
    p = torch.softmax(torch.as_tensor(z) / temperature, dim=-1).numpy().astype(np.float64)
    u = rng.random(p.shape[:-1])[..., None]
    return np.minimum((np.cumsum(p, axis=-1) < u).sum(axis=-1), p.shape[-1] - 1).astype(np.int64)


def sigmoid_samples(rng, z, temperature):
    p = torch.sigmoid(torch.as_tensor(z) / temperature).numpy()
    return (rng.random(p.shape) < p).astype(np.float32)


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_recovers_a_known_temperature_of_a_softmax_head(true_t):
    rng = np.random.default_rng(0)
    z = torch.tensor(rng.normal(0, 3, (6000, 4)), dtype=torch.float32)
    y = softmax_samples(rng, z, true_t)
    y[:50] = -100  # unlabelled rows are left out
    assert fit_temperature(MULTICLASS, z, y) == pytest.approx(true_t, rel=0.1)


@pytest.mark.parametrize("spec,shape", [(BINARY, (6000, 1)), (MULTILABEL, (3000, 3))])
def test_fit_recovers_a_known_temperature_of_a_sigmoid_head(spec, shape):
    rng = np.random.default_rng(1)
    z = torch.tensor(rng.normal(0, 4, shape), dtype=torch.float32)
    y = sigmoid_samples(rng, z, 2.0)
    y = y.reshape(-1) if spec.kind == "binary" else y
    y[:20] = -100
    assert fit_temperature(spec, z, y) == pytest.approx(2.0, rel=0.1)


def test_fit_recovers_a_known_temperature_of_a_grouped_head():
    rng = np.random.default_rng(2)
    z = torch.tensor(rng.normal(0, 3, (3000, 2, 3)), dtype=torch.float32)
    y = softmax_samples(rng, z, 1.7)
    y[:30, 0] = -100
    assert fit_temperature(GROUPED, z, y) == pytest.approx(1.7, rel=0.1)


@pytest.mark.parametrize("spec", [MULTICLASS, BINARY, MULTILABEL, GROUPED])
def test_fitting_lowers_nll_and_ece_of_over_confident_scores(spec):
    rng = np.random.default_rng(3)
    shape = {"binary": (4000, 1), "multiclass": (4000, 4), "multilabel": (4000, 3), "grouped": (4000, 2, 3)}[spec.kind]
    z = rng.normal(0, 1.5, shape)
    over_confident = torch.tensor(z * 4, dtype=torch.float32)  # the model's logits: 4x too large
    if spec.kind == "binary":
        y = sigmoid_samples(rng, z, 1.0).reshape(-1)
    elif spec.kind == "multilabel":
        y = sigmoid_samples(rng, z, 1.0)
    else:
        y = softmax_samples(rng, z, 1.0)
    rep = calibration_report(spec, over_confident, y)
    assert rep["temperature"] == pytest.approx(4.0, rel=0.15)
    assert rep["nll_after"] < rep["nll_before"]
    assert rep["ece_after"] < rep["ece_before"] / 2
    calibrated = dataclasses.replace(spec, temperature=rep["temperature"])
    assert expected_calibration_error(spec, calibrated_probabilities(calibrated, over_confident), y) == pytest.approx(rep["ece_after"])
    assert negative_log_likelihood(spec, over_confident, y, rep["temperature"]) == pytest.approx(rep["nll_after"])


def test_distribution_heads_and_heads_without_labels_get_no_temperature():
    z = torch.randn(10, 3)
    assert fit_temperature(DISTRIBUTION, z, np.full((10, 3), 1 / 3)) is None
    assert fit_temperature(MULTICLASS, torch.randn(5, 4), np.full(5, -100)) is None
    assert expected_calibration_error(MULTICLASS, torch.softmax(torch.randn(5, 4), -1), np.full(5, -100)) is None
    with pytest.raises(HeadSpecError, match="'d'.*temperature"):
        dataclasses.replace(DISTRIBUTION, temperature=2.0)


def test_ece_definition_on_a_hand_example():
    # Binary: 4 entries in the bin [0.8, 0.8667): mean p 0.8, 2 of 4 positive -> gap 0.3; 1 entry p=0.1, negative -> 0.1.
    probs = np.array([[0.8], [0.8], [0.8], [0.8], [0.1]])
    y = np.array([1, 1, 0, 0, 0])
    assert expected_calibration_error(BINARY, probs, y) == pytest.approx((4 * 0.3 + 0.1) / 5)
    # Multiclass top-label: confidences 0.6 (right) and 0.9 (wrong): (0.4 + 0.9) / 2.
    probs = np.array([[0.6, 0.2, 0.1, 0.1], [0.05, 0.9, 0.03, 0.02]])
    assert expected_calibration_error(MULTICLASS, probs, np.array([0, 0])) == pytest.approx((0.4 + 0.9) / 2)


@pytest.mark.parametrize("head", ALL_KIND_HEADS, ids=lambda h: h["kind"])
def test_calibrated_probabilities_without_a_temperature_are_exactly_the_head_probabilities(head):
    spec = HeadSpec.from_dict(head)
    logits = torch.randn(7, *spec.impl.logit_shape(spec)) * 5
    assert torch.equal(calibrated_probabilities(spec, logits), head_probabilities(spec, logits))
    if spec.impl.calibratable:
        warm = dataclasses.replace(spec, temperature=2.0)
        assert torch.equal(calibrated_probabilities(warm, logits), head_probabilities(spec, logits / 2.0))


@pytest.mark.parametrize("spec", [MULTICLASS, GROUPED])
def test_temperature_never_changes_single_choice_decisions(spec):
    logits = torch.randn(200, *spec.impl.logit_shape(spec)) * 3
    plain = spec.impl.predict(spec, head_probabilities(spec, logits).numpy())
    for t in (0.05, 0.3, 3.0, 20.0):
        scaled = spec.impl.predict(spec, calibrated_probabilities(dataclasses.replace(spec, temperature=t), logits).numpy())
        np.testing.assert_array_equal(plain, scaled)


def test_temperature_round_trips_through_the_spec_dict_and_bad_values_name_the_head():
    spec = HeadSpec(name="tone", kind="multiclass", labels=["a", "b"], temperature=1.5)
    assert spec.to_dict()["temperature"] == 1.5
    assert HeadSpec.from_dict(spec.to_dict()) == spec
    assert HeadSpec.from_dict({"name": "tone", "kind": "binary", "labels": ["n", "p"]}).temperature is None
    for bad in (0, 0.0, -1.0, float("inf"), float("nan"), "2", True):
        with pytest.raises(HeadSpecError, match=r"head 'tone': field 'temperature'"):
            HeadSpec(name="tone", kind="multiclass", labels=["a", "b"], temperature=bad)


def test_engine_outputs_calibrated_scores_while_fusion_sees_uncalibrated_ones():
    model = tiny_model()  # "type" reads "trust" through inputs_from
    ids = [[101, 2000 + i, 2001 + 2 * i, 102] for i in range(6)]
    with torch.no_grad():
        plain_logits = model(torch.tensor(ids)).logits
    plain = predict_probabilities(model, ids)
    for name, t in (("trust", 0.25), ("type", 3.0), ("tags", 2.0), ("topic", 0.5)):
        model.set_head_spec(dataclasses.replace(model.specs[name], temperature=t))
    assert model.config.head_specs()[0].temperature == 0.25  # it lives in the saved config
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits
    for name in plain_logits:  # forward (and fusion into "type") is unchanged
        assert torch.equal(logits[name], plain_logits[name])
    scored = predict_probabilities(model, ids)
    np.testing.assert_allclose(scored["trust"], torch.sigmoid(plain_logits["trust"] / 0.25).numpy(), atol=1e-6)
    np.testing.assert_allclose(scored["type"], torch.softmax(plain_logits["type"] / 3.0, -1).numpy(), atol=1e-6)
    np.testing.assert_allclose(scored["topic"], torch.softmax(plain_logits["topic"] / 0.5, -1).numpy(), atol=1e-6)
    np.testing.assert_array_equal(scored["sphere"], plain["sphere"])  # not calibrated
    np.testing.assert_array_equal(scored["type"].argmax(-1), plain["type"].argmax(-1))


@pytest.mark.parametrize("spec", [BINARY, MULTICLASS, MULTILABEL, GROUPED])
def test_reliability_statistics_of_parts_add_up_to_the_ece_of_the_whole(spec):
    rng = np.random.default_rng(3)
    probs = head_probabilities(spec, torch.randn(300, *spec.impl.logit_shape(spec)) * 3).numpy()
    y = {"b": rng.integers(0, 2, 300), "m": rng.integers(0, 4, 300), "g": rng.integers(0, 3, (300, 2)),
         "ml": (rng.random((300, 3)) < 0.4).astype(np.float32)}[spec.name]
    y[:7] = -100  # unlabelled rows are left out
    parts = [reliability_statistics(spec, probs[k], y[k]) for k in np.array_split(rng.permutation(300), 4)]
    total = sum(parts)
    assert ece_from_reliability(total) == pytest.approx(expected_calibration_error(spec, probs, y), rel=1e-12)
    curve = reliability_curve(total)
    entries = 293 * (spec.num_labels if spec is MULTILABEL else len(spec.groups) if spec is GROUPED else 1)
    assert sum(curve["count"]) == entries and len(curve["count"]) == 15
    assert all(c is None or lo <= c <= lo + 1 / 15 + 1e-12 for c, lo in zip(curve["confidence"], np.arange(15) / 15))
    assert ece_from_reliability(np.zeros((1, 3, 15))) is None


def test_the_held_out_check_keeps_a_calibration_that_helps_and_drops_one_fitted_to_noise():
    rng = np.random.default_rng(4)
    z = rng.normal(0, 2, (3000, 4))
    y = softmax_samples(rng, z, 1.0)
    calibrated_already = fit_calibration(MULTICLASS, torch.tensor(z, dtype=torch.float32), y)
    assert calibrated_already["fitted_temperature"] != 1.0  # the full fit moves a little...
    assert not calibrated_already["kept"] and calibrated_already["temperature"] is None  # ...but not on held-out rows
    assert calibrated_already["heldout_gain"] < DEFAULT_MIN_GAIN
    rep = calibration_report(MULTICLASS, torch.tensor(z, dtype=torch.float32), y)
    assert rep["nll_after"] == rep["nll_before"] and rep["ece_after"] == rep["ece_before"]  # not kept: unchanged
    over = fit_calibration(MULTICLASS, torch.tensor(3 * z, dtype=torch.float32), y)
    assert over["kept"] and over["temperature"] == pytest.approx(3.0, rel=0.1) and over["heldout_gain"] > 0.1


def test_a_positive_weight_shift_is_undone_by_the_prior_offset_and_decisions_never_change():
    """A weighted BCE learns logit = log(w) + logit(p): the offset removes log(w), the temperature the scale."""
    rng = np.random.default_rng(5)
    weights = [50.0, 4.0, 1.0]
    spec = HeadSpec(name="ml", kind="multilabel", labels=["x", "y", "z"], pos_weight=weights, thresholds=[0.8, 0.5, 0.3])
    assert spec.impl.prior_offset(spec) == pytest.approx(np.log(weights).tolist())
    truth = rng.normal(-3, 1.5, (6000, 3))  # rare positives
    y = sigmoid_samples(rng, truth, 1.0)
    model_logits = torch.tensor(2.0 * truth + np.log(weights), dtype=torch.float32)  # over-confident and shifted
    fit = fit_calibration(spec, model_logits, y)
    assert fit["kept"] and fit["temperature"] == pytest.approx(2.0, rel=0.1)
    assert fit["logit_offset"] == pytest.approx(np.log(weights).tolist())
    calibrated = calibrate_spec(spec, fit["temperature"], fit["logit_offset"])
    raw_p, cal_p = head_probabilities(spec, model_logits).numpy(), calibrated_probabilities(calibrated, model_logits).numpy()
    assert expected_calibration_error(spec, cal_p, y) < expected_calibration_error(spec, raw_p, y) / 5
    # Thresholds are mapped with the scores: the same rows are positive, label by label.
    np.testing.assert_array_equal(spec.impl.predict(spec, raw_p), calibrated.impl.predict(calibrated, cal_p))
    assert calibrated.thresholds != spec.thresholds
    back = uncalibrate_spec(calibrated)
    assert back.temperature is None and back.logit_offset is None
    assert back.thresholds == pytest.approx(spec.thresholds, abs=1e-9)
    assert HeadSpec.from_dict(calibrated.to_dict()) == calibrated
    with pytest.raises(ValueError, match="'ml' is already calibrated"):
        calibrate_spec(calibrated, 1.0)


def test_binary_default_threshold_is_mapped_and_a_temperature_alone_keeps_decisions():
    rng = np.random.default_rng(6)
    logits = torch.tensor(rng.normal(0, 4, (500, 1)), dtype=torch.float32)
    for offset in (None, [2.5]):
        calibrated = calibrate_spec(BINARY, 0.7, offset)
        np.testing.assert_array_equal(BINARY.impl.predict(BINARY, head_probabilities(BINARY, logits).numpy()),
                                      calibrated.impl.predict(calibrated, calibrated_probabilities(calibrated, logits).numpy()))
    assert calibrate_spec(BINARY, 0.7).thresholds == pytest.approx(0.5)
    assert calibrate_spec(MULTICLASS, 2.0).thresholds is None


@pytest.mark.parametrize("bad,message", [
    ({"kind": "multiclass", "labels": ["a", "b"], "temperature": 1.0, "logit_offset": [0.0, 0.0]}, "applies to binary and multilabel heads"),
    ({"kind": "binary", "labels": ["n", "p"], "logit_offset": [1.0]}, "needs a temperature"),
    ({"kind": "multilabel", "labels": ["a", "b"], "temperature": 1.0, "logit_offset": [1.0]}, "list of 2 finite numbers"),
    ({"kind": "binary", "labels": ["n", "p"], "temperature": 1.0, "logit_offset": [float("nan")]}, "list of 1 finite numbers"),
])
def test_a_bad_logit_offset_names_the_head_and_field(bad, message):
    with pytest.raises(HeadSpecError, match=rf"head 'h': field 'logit_offset'.*{message}"):
        HeadSpec(name="h", **bad)
