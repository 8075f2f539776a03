"""Prediction profiles (mergeable, per head kind) and PSI drift (mtcls.profile)."""

import math

import numpy as np
import pytest

from mtcls import HeadSpec
from mtcls.profile import (
    SCORE_BINS, drift_report, empty_head_profile, head_drift, head_profile, merge_profiles, population_stability_index,
    summarize,
)
from tests.conftest import ALL_KIND_HEADS

SPECS = [HeadSpec.from_dict(h) for h in ALL_KIND_HEADS]


def random_probs(spec, n, rng):
    shape = spec.impl.logit_shape(spec)
    z = rng.normal(size=(n, *shape)) * 2
    if spec.kind in ("binary", "multilabel"):
        return 1 / (1 + np.exp(-z))
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_profiles_of_parts_sum_to_the_profile_of_the_whole(spec):
    rng = np.random.default_rng(0)
    probs = random_probs(spec, 300, rng)
    whole = head_profile(spec, probs)
    parts = [head_profile(spec, p) for p in np.array_split(probs, [0, 17, 120, 299])]  # an empty part too
    merged = merge_profiles([{spec.name: p} for p in parts])[spec.name]
    assert merged["rows"] == whole["rows"] == 300 and merged["mix"] == whole["mix"] and merged["score_hist"] == whole["score_hist"]
    assert math.isclose(merged["score_sum"], whole["score_sum"], rel_tol=1e-12)
    assert merge_profiles([{spec.name: empty_head_profile(spec)}, {spec.name: whole}])[spec.name]["mix"] == whole["mix"]
    # The histogram counts every decision: one per row, one per group for grouped heads.
    decisions = 300 * (spec.num_groups if spec.kind == "grouped" else 1)
    assert sum(whole["score_hist"]) == decisions and len(whole["score_hist"]) == SCORE_BINS


def test_the_mix_counts_the_decisions_the_output_columns_hold():
    rng = np.random.default_rng(1)
    for spec in SPECS:
        probs = random_probs(spec, 200, rng)
        columns = spec.impl.decode(spec, probs)
        summary = summarize(spec, head_profile(spec, probs))
        mix = summary["prediction_mix"]
        if spec.kind == "multilabel":  # thresholds 0.3, 0.5, 0.7: per-label positive rates of <head>_labels
            labels = columns["tags_labels"].to_pylist()
            assert mix == {l: pytest.approx(sum(l in row for row in labels) / 200) for l in spec.labels}
        elif spec.kind == "grouped":
            for g in spec.groups:
                picked = columns[f"topic_{g}_label"].to_pylist()
                assert mix[g] == {l: pytest.approx(picked.count(l) / 200) for l in spec.labels}
        else:  # binary at its threshold, arg-max otherwise: shares of <head>_label
            picked = columns[f"{spec.name}_label"].to_pylist()
            assert mix == {l: pytest.approx(picked.count(l) / 200) for l in spec.labels}
            assert summary["mean_score"] == pytest.approx(float(np.mean(columns[f"{spec.name}_score"])), abs=1e-6)


def test_psi_values():
    assert population_stability_index([0.5, 0.5], [0.5, 0.5]) == 0
    p, q = np.array([0.7, 0.3]), np.array([0.5, 0.5])
    assert population_stability_index(p, q) == pytest.approx(float(np.sum((p - q) * np.log(p / q))))
    assert population_stability_index([1.0, 0.0], [0.0, 1.0]) > 10  # floored, finite
    assert population_stability_index([0.2, 0.8], [0.5, 0.5]) == population_stability_index([0.8, 0.2], [0.5, 0.5])


def test_drift_flags_the_shifted_head_and_names_the_worst_part():
    rng = np.random.default_rng(2)
    specs = {s.name: s for s in SPECS}
    reference = {n: head_profile(s, random_probs(s, 2000, rng)) for n, s in specs.items()}
    same = {n: head_profile(s, random_probs(s, 1000, rng)) for n, s in specs.items()}
    report = drift_report(SPECS, same, reference, 0.2)
    assert report["flagged"] == [] and all(h["psi"] < 0.05 for h in report["heads"].values())
    # Multilabel: only label z turns positive everywhere; grouped: only group race drifts.
    tags = specs["tags"]
    shifted = random_probs(tags, 1000, rng)
    shifted[:, 2] = 0.99
    d = head_drift(tags, head_profile(tags, shifted), reference["tags"], 0.2)
    assert d["flagged"] and d["worst_part"] == "z" and d["parts"]["x"] < 0.05
    topic = specs["topic"]
    shifted = random_probs(topic, 1000, rng)
    shifted[:, 1, :] = [0.01, 0.97, 0.01, 0.01]
    d = head_drift(topic, head_profile(topic, shifted), reference["topic"], 0.2)
    assert d["flagged"] and d["worst_part"] == "race" and d["parts"]["economy"] < 0.05
    # A higher threshold stops flagging the same shift; a reference with another label set is not compared.
    assert not head_drift(topic, head_profile(topic, shifted), reference["topic"], d["psi"] + 1)["flagged"]
    other = {"type": {**reference["type"], "mix": [1, 2]}}
    assert drift_report([specs["type"]], same, other, 0.2)["heads"]["type"]["psi"] is None
    assert drift_report(SPECS, same, None, 0.2) == {"threshold": 0.2, "min_rows": 100, "reference": False, "heads": {},
                                                    "flagged": []}


def test_drift_on_too_few_rows_is_reported_not_flagged():
    rng = np.random.default_rng(3)
    tags = next(s for s in SPECS if s.name == "tags")
    reference = head_profile(tags, random_probs(tags, 30, rng))
    shifted = random_probs(tags, 1000, rng)
    shifted[:, 2] = 0.99
    judged = head_drift(tags, head_profile(tags, shifted), reference, 0.2, min_rows=30)
    assert judged["flagged"] and "note" not in judged
    skipped = head_drift(tags, head_profile(tags, shifted), reference, 0.2, min_rows=31)
    assert not skipped["flagged"] and skipped["psi"] == judged["psi"]
    assert skipped["note"] == "not judged: 1000 rows scored and 30 in the reference; drift_min_rows is 31"
    assert drift_report([tags], {"tags": head_profile(tags, shifted)}, {"tags": reference}, 0.2)["flagged"] == []
