"""Training's validation with calibration: one worker, and two gloo workers that must agree with it."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtcls.calibration import calibrate_spec, uncalibrate_spec
from pipelines.train.validation import validate
from tests.conftest import tiny_model

HEADS = [
    {"name": "trust", "kind": "binary", "labels": ["ok", "bad"]},
    {"name": "type", "kind": "multiclass", "labels": ["news", "opinion", "ad"], "inputs_from": ["trust"]},
    {"name": "tags", "kind": "multilabel", "labels": ["x", "y", "z"]},
    {"name": "sphere", "kind": "distribution", "labels": ["cs", "math", "bio"]},
]


class Shard:
    """What ``validate`` reads of a Ray Data shard: numpy batches with ``row``, ``input_ids`` and ``y_<head>``."""

    def __init__(self, n: int = 90, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.columns = {
            "row": np.arange(n),
            "input_ids": np.array([[101, *rng.integers(1000, 3000, rng.integers(2, 9)).tolist(), 102] for _ in range(n)], dtype=object),
            "y_trust": rng.integers(0, 2, n).astype(np.int64),
            "y_type": rng.integers(0, 3, n).astype(np.int64),
            "y_tags": rng.integers(0, 2, (n, 3)).astype(np.float32),
            "y_sphere": rng.dirichlet(np.ones(3), n).astype(np.float32),
        }
        self.columns["y_type"][:5] = -100

    def iter_batches(self, batch_size: int, batch_format: str):
        n = len(self.columns["row"])
        for i in range(0, n, batch_size):
            yield {k: (v[i:i + batch_size] if v.ndim == 1 else list(v[i:i + batch_size])) for k, v in self.columns.items()}


def run_validate(rank: int, world: int) -> dict:
    model = tiny_model(heads=HEADS, seed=3)
    with torch.no_grad():
        model.heads["h_type"].net[-1].weight.mul_(40.0)  # over-confident logits
    return validate(model, Shard(), list(model.specs.values()), 16, 0, torch.device("cpu"), rank, world, tune_bins=50,
                    calibrate=True)


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = run_validate(rank, world)
    finally:
        dist.destroy_process_group()


def test_validation_fits_calibrations_and_keeps_only_those_that_help_on_held_out_rows():
    result = run_validate(0, 1)
    reports = result.reports
    assert "calibration" not in reports["sphere"]  # distribution heads are not calibrated
    for head in ("trust", "type", "tags"):
        cal = reports[head]["calibration"]
        assert 0.05 <= cal["fitted_temperature"] <= 20 and cal["kept"] == (cal["temperature"] is not None)
        assert cal["nll_after"] <= cal["nll_before"] + 1e-6
        assert result.heads[head].temperature == cal["temperature"]  # the head as exported
    assert reports["type"]["calibration"]["kept"] and reports["type"]["calibration"]["temperature"] > 2  # cooled down
    assert not reports["trust"]["calibration"]["kept"]  # random labels: a fit gains nothing on held-out folds
    assert result.heads["trust"].to_dict() == tiny_model(heads=HEADS, seed=3).specs["trust"].to_dict()
    assert "tuned_thresholds" in reports["tags"]
    uncalibrated = validate(tiny_model(heads=HEADS, seed=3), Shard(), [s for s in tiny_model(heads=HEADS, seed=3).specs.values()],
                            16, 0, torch.device("cpu"), 0, 1, tune_bins=50, calibrate=False)
    assert all("calibration" not in r for r in uncalibrated.reports.values())


@pytest.mark.slow
def test_two_workers_fit_the_same_temperatures_as_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    single = run_validate(0, 1)
    for head in ("trust", "type", "tags"):
        temps = [out[r].reports[head]["calibration"]["temperature"] for r in (0, 1)]
        assert temps[0] == temps[1]  # the workers cannot diverge
        # Same data in another order: the same fit up to float rounding (random labels leave the
        # NLL of "trust" and "tags" nearly flat in T, so compare the NLL reached there).
        cal = single.reports[head]["calibration"]
        assert out[0].reports[head]["calibration"]["nll_after"] == pytest.approx(cal["nll_after"], rel=1e-5)
    assert out[0].reports["type"]["calibration"]["temperature"] == pytest.approx(
        single.reports["type"]["calibration"]["temperature"], rel=1e-3)
    assert out[0].metrics == out[1].metrics
    assert out[0].reports["tags"]["tuned_thresholds"] == out[1].reports["tags"]["tuned_thresholds"]
    for key in ("trust_macro_f1", "type_macro_f1", "tags_macro_f1", "sphere_macro_f1", "mean_macro_f1"):
        assert out[0].metrics[key] == pytest.approx(single.metrics[key], abs=1e-9)
    # The reference profile is summed over the workers: both hold the same, and it is the one worker's.
    for head in ("trust", "type", "tags", "sphere"):
        assert out[0].profiles[head] == out[1].profiles[head]
        mine, one = out[0].profiles[head], single.profiles[head]
        assert mine["rows"] == one["rows"] == 90 and mine["label_counts"] == one["label_counts"]
        assert mine["labelled_rows"] == one["labelled_rows"]
    for head in ("type", "sphere"):  # arg-max decisions: the temperature's last bits cannot flip them
        assert out[0].profiles[head]["mix"] == single.profiles[head]["mix"]


def test_a_warm_started_calibrated_head_is_validated_on_raw_scores_and_keeps_its_calibration():
    model = tiny_model(heads=HEADS, seed=3)
    calibrated = calibrate_spec(model.specs["tags"], 2.0, [0.5, 1.0, 1.5])
    specs = [calibrated if s.name == "tags" else s for s in model.specs.values()]
    result = validate(model, Shard(), specs, 16, 0, torch.device("cpu"), 0, 1, tune_bins=50, calibrate=False)
    head = result.heads["tags"]
    assert head.temperature == 2.0 and head.logit_offset == [0.5, 1.0, 1.5]
    tuned = result.reports["tags"]["tuned_thresholds"]
    assert head.thresholds == tuned["thresholds"]  # exported on the calibrated scale...
    assert uncalibrate_spec(head).thresholds == pytest.approx(tuned["raw_thresholds"], abs=1e-9)  # ...tuned on the raw one
    plain = validate(model, Shard(), list(model.specs.values()), 16, 0, torch.device("cpu"), 0, 1, tune_bins=50, calibrate=False)
    assert plain.reports["tags"]["tuned_thresholds"]["raw_thresholds"] == tuned["raw_thresholds"]
    assert plain.metrics["tags_tuned_macro_f1"] == result.metrics["tags_tuned_macro_f1"]
