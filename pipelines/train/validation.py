"""Training's validation: exact metrics over the workers, calibration, threshold tuning, the exported heads.

Validation rows are split between workers by row number (``row % world == rank``). Each worker runs
its rows through :class:`mtcls.InferenceEngine` (token ids, or the heads only on cached features)
and keeps their raw logits and labels; everything else is computed from those:

1. :func:`fit_calibrations` (with ``calibrate``): per calibratable head, the temperature
   minimising its validation NLL after the kind's prior offset, kept only if it lowers the NLL of
   held-out folds (:func:`mtcls.calibration.calibration_report`). Fitting needs every validation
   logit, not a sum: the workers all-gather them in rank order and every worker fits the same
   temperature on the same data, so they cannot diverge.
2. :func:`head_metrics`: the library's mergeable statistics of the calibrated scores (as the
   exported model outputs them), all-reduced, then each head's report and macro-F1.
3. :func:`tune_thresholds` (with ``tune_bins``): per-label thresholds maximising validation F1,
   from threshold histograms summed like the statistics. They are tuned on the raw scores and
   mapped through the calibration (:func:`mtcls.calibration.calibrate_spec`), which is tuning on
   the calibrated scores over the mapped grid: the same decisions, so calibration cannot move a
   head's macro-F1.
4. The reference profile of the heads as exported (:mod:`pipelines.train.reference`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from mtcls import HeadSpec, InferenceEngine, MultiTaskModel, Tokens, head_report, head_statistics
from mtcls.calibration import calibrate_spec, calibrated_probabilities, calibration_report, uncalibrate_spec
from mtcls.metrics import empty_statistics, merge_statistics
from mtcls.modeling import head_probabilities
from mtcls.thresholds import best_thresholds, threshold_histograms
from pipelines.train.features import FEATURES
from pipelines.train.reference import reference_profiles

#: Per head, this worker's validation logits (N, *logit shape) and encoded labels.
Logits = dict[str, tuple[torch.Tensor, np.ndarray]]
#: Per head, a calibration: ``(temperature, logit_offset)``, both None for none.
Calibration = tuple[Optional[float], Optional[list[float]]]


@dataclass(frozen=True)
class Validation:
    """One validation of the whole validation set (the same on every worker).

    Attributes:
        metrics: ``<head>_macro_f1`` per head, ``mean_macro_f1``, and ``<head>_tuned_macro_f1``
            per head with tuned thresholds.
        reports: Per head, :func:`mtcls.head_report`, plus ``calibration`` (when fitted) and
            ``tuned_thresholds`` (when tuned).
        heads: Per head, the head as it is exported: its calibration, and thresholds tuned on the
            raw scores mapped to the calibrated ones.
        profiles: Per head, its reference profile (:func:`pipelines.train.reference.reference_profiles`).
    """

    metrics: dict[str, float]
    reports: dict[str, dict[str, Any]]
    heads: dict[str, HeadSpec]
    profiles: dict[str, dict[str, Any]]

    def record(self) -> dict[str, Any]:
        """Plain values for the run state's history (it travels in checkpoints): metrics, reports,
        ``heads`` as spec dicts and ``profiles``."""
        return {**self.metrics, "reports": self.reports, "heads": {n: h.to_dict() for n, h in self.heads.items()},
                "profiles": self.profiles}


def validate(model: MultiTaskModel, shard: Any, specs: Sequence[HeadSpec], batch_size: int, pad_id: int,
             device: torch.device, rank: int, world: int, tune_bins: int = 0, calibrate: bool = False) -> Validation:
    """Validates the model on the whole validation set; every worker calls it and gets the same result.

    Args:
        model: The (unwrapped) model, on ``device``; left in eval mode.
        shard: The validation dataset (every worker reads all of it; rows ``row % world == rank``
            are this worker's): numpy batches with ``row``, ``input_ids`` (or ``features``) and
            ``y_<head>``.
        specs: The heads to validate, as they are now (a warm start's calibration, if any, is
            kept unless a new one is fitted).
        batch_size: Rows read at once; each batch is one forward pass.
        pad_id: Padding token id.
        device: The model's device.
        rank: This worker's rank.
        world: Number of workers.
        tune_bins: Bins of threshold tuning (0: no tuning).
        calibrate: Fit calibrations.

    Returns:
        The metrics and reports (see :class:`Validation`).
    """
    local = validation_logits(model, shard, specs, batch_size, pad_id, device, rank, world)
    given = {s.name: (s.temperature, s.logit_offset) for s in specs}  # a warm start's calibration, if any
    raw = [uncalibrate_spec(s) for s in specs]  # thresholds on the raw scores
    calibration = fit_calibrations(raw, local, world) if calibrate else {}
    fitted: dict[str, Calibration] = {**given, **{n: (c["temperature"], c["logit_offset"]) for n, c in calibration.items()}}
    # The heads whose scores are measured: calibrated, their thresholds mapped to the calibrated scores.
    scored = {s.name: calibrate_spec(s, *fitted[s.name]) for s in raw}
    metrics, reports = head_metrics(scored, local, world)
    for name, result in calibration.items():
        reports[name]["calibration"] = result
    exported = dict(scored)
    tuned = tune_thresholds([s for s in raw if tune_bins and s.impl.tuned_in_training], local, tune_bins, world, fitted)
    for name, (head, result) in tuned.items():
        exported[name] = head
        reports[name]["tuned_thresholds"] = result
        metrics[f"{name}_tuned_macro_f1"] = result["macro_f1"]
    profiles = reference_profiles(list(exported.values()), local, world)
    return Validation(metrics, reports, exported, profiles)


def validation_logits(model: MultiTaskModel, shard: Any, specs: Sequence[HeadSpec], batch_size: int, pad_id: int,
                      device: torch.device, rank: int, world: int) -> Logits:
    """This worker's validation rows through the inference engine: per head, raw logits and labels.

    The engine runs at fp32 (validation never autocasts), each batch of this worker's rows in one
    forward pass in shard order: the temperature search is sensitive to the last float bits of the
    logits, so the batching stays fixed between runs (and equal to what it always was). On cached
    features it runs only the heads (:meth:`mtcls.InferenceEngine.predict_pooled`).

    Returns:
        ``{head: ((N, *logit shape) float32 logits, (N, ...) labels)}`` for the heads with rows here.
    """
    engine = InferenceEngine(model, None, "fp32", device=device, pad_token_id=pad_id, with_logits=True)
    logits: dict[str, list[torch.Tensor]] = {s.name: [] for s in specs}
    labels: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        mine = np.flatnonzero(batch["row"] % world == rank)
        if not len(mine):
            continue
        if FEATURES in batch:  # cached features: only the heads run
            out = engine.predict_pooled(np.ascontiguousarray(batch[FEATURES][mine], dtype=np.float32))
        else:
            out = engine.predict_tokens(Tokens.from_rows([batch["input_ids"][i] for i in mine]), batches=[np.arange(len(mine))])
        for spec in specs:
            logits[spec.name].append(torch.from_numpy(out.logits[spec.name]))
            labels[spec.name].append(np.stack([batch[f"y_{spec.name}"][i] for i in mine]))
    return {n: (torch.cat(logits[n]), np.concatenate(labels[n])) for n in logits if logits[n]}


def fit_calibrations(specs: Sequence[HeadSpec], local: Logits, world: int) -> dict[str, dict[str, Any]]:
    """Per calibratable head, :func:`mtcls.calibration.calibration_report` on every worker's validation rows.

    Above one worker, the rows' logits and labels are all-gathered (in rank order, so every worker
    fits on the same data and gets the same temperature).

    Args:
        specs: The heads, uncalibrated.
        local: This worker's logits and labels.
        world: Number of workers (every worker must call this).

    Returns:
        ``{head: report}`` with the fitted ``temperature`` and ``logit_offset`` (None when not kept).
    """
    parts = [{n: (z.numpy(), y) for n, (z, y) in local.items()}]
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, parts[0])
        parts = gathered
    out = {}
    for spec in specs:
        mine = [p[spec.name] for p in parts if spec.name in p]
        if spec.impl.calibratable and mine:
            z = torch.from_numpy(np.concatenate([m[0] for m in mine]))
            out[spec.name] = calibration_report(spec, z, np.concatenate([m[1] for m in mine]))
    return out


def head_metrics(scored: dict[str, HeadSpec], local: Logits, world: int) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Each head's report of its calibrated scores over every worker's rows, and the macro-F1 metrics.

    Args:
        scored: The heads as measured (calibrated, thresholds on the calibrated scores), by name.
        local: This worker's logits and labels.
        world: Number of workers (every worker must call this).

    Returns:
        ``(metrics, reports)``: ``<head>_macro_f1`` and ``mean_macro_f1``; ``{head: head_report}``.
    """
    stats = {name: empty_statistics(spec) for name, spec in scored.items()}
    for name, (z, y) in local.items():
        spec = scored[name]
        stats[name] = merge_statistics(stats[name], head_statistics(spec, y, calibrated_probabilities(spec, z).numpy()))
    _sum_over_workers(stats.values(), world)
    reports = {name: head_report(spec, stats[name]) for name, spec in scored.items()}
    metrics = {f"{n}_macro_f1": r["macro_f1"] for n, r in reports.items()}
    metrics["mean_macro_f1"] = float(np.mean(list(metrics.values())))
    return metrics, reports


def tune_thresholds(specs: Sequence[HeadSpec], local: Logits, bins: int, world: int,
                    fitted: dict[str, Calibration]) -> dict[str, tuple[HeadSpec, dict[str, Any]]]:
    """Per head, the thresholds maximising validation F1, tuned on the raw scores, as exported.

    Args:
        specs: The heads to tune, uncalibrated (thresholds on the raw scores).
        local: This worker's logits and labels.
        bins: Threshold histogram bins over [0, 1].
        world: Number of workers (every worker must call this).
        fitted: Every head's calibration.

    Returns:
        ``{head: (exported head, result)}``: the head with its tuned thresholds and calibration
        (thresholds mapped to the calibrated scores); the result of
        :func:`mtcls.thresholds.best_thresholds` with ``macro_f1``, ``thresholds`` as exported and
        ``raw_thresholds`` as tuned.
    """
    hists = {s.name: {"pos": np.zeros((s.num_labels, bins), np.int64), "neg": np.zeros((s.num_labels, bins), np.int64)}
             for s in specs}
    for spec in specs:
        if spec.name in local:
            z, y = local[spec.name]
            for key, value in threshold_histograms(spec, y, head_probabilities(spec, z).numpy(), bins).items():
                hists[spec.name][key] += value
    _sum_over_workers(hists.values(), world)
    out = {}
    for spec in specs:
        result = best_thresholds(spec, hists[spec.name])
        result = {**result, "macro_f1": float(np.mean(result["f1"]))}
        exported = calibrate_spec(spec.impl.with_thresholds(spec, result["thresholds"]), *fitted[spec.name])
        result["raw_thresholds"], result["thresholds"] = result["thresholds"], exported.label_thresholds()
        out[spec.name] = (exported, result)
    return out


def _sum_over_workers(parts: Iterable[dict[str, np.ndarray]], world: int) -> None:
    """All-reduces (sums) every array of ``parts`` in place, in order (every worker must call this)."""
    if world <= 1:
        return
    import torch.distributed as dist

    for part in parts:
        for key, value in part.items():
            t = torch.as_tensor(value)
            dist.all_reduce(t)
            part[key] = t.numpy()
