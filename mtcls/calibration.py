"""Temperature scaling: calibrated scores from one scalar per head.

A head with ``temperature`` T outputs the kind's probabilities of ``(logits - logit_offset) / T``
(softmax for multiclass and grouped heads, sigmoid for binary and multilabel heads). T > 0 keeps
the order of each row's logits, so the arg-max of single-choice heads never changes; only how
confident the scores are. T is fitted on labelled validation data by minimising the kind's
negative log-likelihood (:meth:`mtcls.kinds.HeadKind.calibration_nll`). ``distribution`` heads are
not calibrated (``calibratable = False``): they are trained on soft targets, and their
probabilities are the predicted distribution itself.

``logit_offset`` (sigmoid heads trained with ``pos_weight`` only) is ``log(pos_weight)`` per
label, not fitted: a BCE whose positives weigh w is minimised by ``logit = log(w) + logit(p)``, so
the weight shifts every logit by ``log(w)`` (up to ~6 for GoEmotions' rarest labels under
``"balanced"``), which no temperature can undo. Sigmoid heads decide by thresholds, and
:func:`calibrate_spec` maps them through the same monotone map, so calibration never changes a
decision of any head.

A fitted calibration is kept only when it lowers the NLL of validation rows it was not fitted on
(:func:`fit_calibration`: k-fold, at least ``min_gain``); otherwise the head stays uncalibrated,
which is what keeps a head whose validation scores are already calibrated from being moved by noise.

Calibration applies to the scores a model outputs (:class:`mtcls.inference.InferenceEngine`), not
inside the model: :meth:`mtcls.MultiTaskModel.forward_heads` still feeds later heads the
uncalibrated probabilities they were trained on (``inputs_from``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

import numpy as np
import torch

from mtcls.heads import HeadSpec
from mtcls.modeling import head_probabilities

#: Bounds of the fitted temperature.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
DEFAULT_ECE_BINS = 15

Array = Union[np.ndarray, torch.Tensor]


#: Folds of the held-out check in :func:`fit_calibration`.
DEFAULT_FOLDS = 5
#: Smallest relative NLL reduction on held-out folds for a calibration to be kept.
DEFAULT_MIN_GAIN = 0.005


def calibrated_probabilities(spec: HeadSpec, logits: torch.Tensor) -> torch.Tensor:
    """The head's output scores: its kind's probabilities of ``(logits - logit_offset) / temperature``.

    With ``temperature`` None this is exactly :func:`mtcls.modeling.head_probabilities`.
    """
    if spec.temperature is None:
        return head_probabilities(spec, logits)
    return head_probabilities(spec, scaled_logits(logits, spec.temperature, spec.logit_offset))


def scaled_logits(logits: torch.Tensor, temperature: Optional[float], offset: Optional[list[float]]) -> torch.Tensor:
    """``(logits - offset) / temperature``; a None offset or temperature is left out."""
    z = logits
    if offset is not None:
        z = z - torch.as_tensor(offset, dtype=z.dtype, device=z.device).reshape(-1)
    return z if temperature is None else z / temperature


def calibrate_spec(spec: HeadSpec, temperature: Optional[float], offset: Optional[list[float]] = None) -> HeadSpec:
    """``spec`` (uncalibrated) with a calibration, its decision thresholds mapped to the calibrated scores.

    For threshold kinds every threshold t becomes ``sigmoid((logit(t) - offset) / temperature)``,
    so ``calibrated p >= mapped t`` exactly when ``p >= t``: the same rows are predicted positive.

    Args:
        spec: The head without a calibration (thresholds on its raw probabilities).
        temperature: None leaves the head uncalibrated (``spec`` is returned).
        offset: Per-logit offset (:meth:`mtcls.kinds.HeadKind.prior_offset`), or None.

    Raises:
        ValueError: If ``spec`` is already calibrated.
    """
    if spec.temperature is not None:
        raise ValueError(f"head {spec.name!r} is already calibrated (temperature {spec.temperature})")
    if temperature is None:
        return spec
    out = dataclasses.replace(spec, temperature=float(temperature), logit_offset=None if offset is None else [float(v) for v in offset])
    return _map_thresholds(out, lambda z, off: (z - off) / temperature, offset)


def uncalibrate_spec(spec: HeadSpec) -> HeadSpec:
    """The inverse of :func:`calibrate_spec`: ``spec`` without its calibration, thresholds on the raw scores."""
    if spec.temperature is None:
        return spec
    temperature, offset = spec.temperature, spec.logit_offset
    out = dataclasses.replace(spec, temperature=None, logit_offset=None)
    return _map_thresholds(out, lambda z, off: z * temperature + off, offset)


def _map_thresholds(spec: HeadSpec, logit_map: Any, offset: Optional[list[float]]) -> HeadSpec:
    """Threshold kinds: every threshold t -> sigmoid(logit_map(logit(t), offset))."""
    if not spec.impl.tunable:
        return spec
    t = np.clip(np.asarray(spec.label_thresholds(), np.float64), 1e-12, 1 - 1e-12)
    off = np.broadcast_to(np.asarray(0.0 if offset is None else offset, np.float64), t.shape)
    mapped = 1.0 / (1.0 + np.exp(-logit_map(np.log(t) - np.log1p(-t), off)))
    return spec.impl.with_thresholds(spec, [float(v) for v in np.clip(mapped, 1e-9, 1 - 1e-9)])


def _logits(logits: Array) -> torch.Tensor:
    return torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).detach().float().cpu()


def negative_log_likelihood(spec: HeadSpec, logits: Array, labels: np.ndarray, temperature: Optional[float] = None,
                            offset: Optional[list[float]] = None) -> Optional[float]:
    """Mean NLL of the labelled entries of one head at a calibration (None: raw logits), or None without labels."""
    total, count = spec.impl.calibration_nll(spec, scaled_logits(_logits(logits), temperature, offset), labels)
    return float(total / count) if float(count) > 0 else None


def fit_temperature(spec: HeadSpec, logits: Array, labels: np.ndarray, bounds: tuple[float, float] = (MIN_TEMPERATURE, MAX_TEMPERATURE),
                    tol: float = 1e-4, offset: Optional[list[float]] = None) -> Optional[float]:
    """The temperature minimising the head's validation NLL of ``(logits - offset) / T``, by golden-section search on log T.

    The NLL of softmax and sigmoid likelihoods is convex in 1/T, hence unimodal in log T, so the
    search finds the minimum inside ``bounds`` (or the nearer bound).

    Args:
        spec: The head (its own ``temperature`` is ignored: ``logits`` are the raw logits).
        logits: (N, *logit shape) raw logits of labelled and unlabelled rows.
        labels: The encoded labels of those rows (missing and invalid labels are left out).
        bounds: Smallest and largest temperature.
        tol: Stops when the bracket on log T is narrower than this.
        offset: Per-logit offset subtracted first (None: none).

    Returns:
        The temperature, or None when the kind is not calibrated or no entry has a label.
    """
    if not spec.impl.calibratable:
        return None
    z = scaled_logits(_logits(logits), None, offset)
    if float(spec.impl.calibration_nll(spec, z, labels)[1]) <= 0:
        return None

    def f(u: float) -> float:
        total, count = spec.impl.calibration_nll(spec, z / math.exp(u), labels)
        return float(total / count)

    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = math.log(bounds[0]), math.log(bounds[1])
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return float(math.exp((a + b) / 2.0))


def expected_calibration_error(spec: HeadSpec, probs: Array, labels: np.ndarray, bins: int = DEFAULT_ECE_BINS) -> Optional[float]:
    """Expected calibration error of a head's scores on labelled rows (equal-width bins over [0, 1]).

    ``ECE = sum_b (n_b / n) * |mean confidence_b - mean outcome_b|`` over the bins ``b`` of the
    confidences. Single-choice heads (multiclass, distribution; grouped: every labelled group of
    every row pooled): top-label ECE, the confidence being the highest probability and the outcome
    whether its label is the true one. Binary and multilabel heads: per label, the ECE of the
    positive-class probability against the label's presence, averaged over the labels that have
    labelled entries.

    Returns:
        The ECE in [0, 1], or None when no entry has a label.
    """
    return ece_from_reliability(reliability_statistics(spec, probs, labels, bins))


def reliability_statistics(spec: HeadSpec, probs: Array, labels: np.ndarray, bins: int = DEFAULT_ECE_BINS) -> np.ndarray:
    """Per reliability pair and equal-width confidence bin: entries, sum of confidence, sum of outcome.

    The pairs are the kind's (:meth:`mtcls.kinds.HeadKind.reliability`: one for single-choice
    heads, one per label for binary and multilabel heads). The sums of two sets of rows are the sums
    of the union, so blocks scored apart merge by addition (float sums: up to rounding).

    Returns:
        (pairs, 3, bins) float64: ``[:, 0]`` entries, ``[:, 1]`` summed confidence, ``[:, 2]`` summed outcome.
    """
    p = probs.detach().float().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    pairs = spec.impl.reliability(spec, p, labels)
    out = np.zeros((len(pairs), 3, bins), np.float64)
    for k, (confidence, outcome) in enumerate(pairs):
        confidence = np.asarray(confidence, np.float64)
        idx = np.clip((confidence * bins).astype(np.int64), 0, bins - 1)
        out[k, 0] = np.bincount(idx, minlength=bins)
        out[k, 1] = np.bincount(idx, confidence, minlength=bins)
        out[k, 2] = np.bincount(idx, np.asarray(outcome, np.float64), minlength=bins)
    return out


def ece_from_reliability(stats: np.ndarray) -> Optional[float]:
    """The ECE (see :func:`expected_calibration_error`) from summed :func:`reliability_statistics`.

    Per pair ``sum_b |sum confidence_b - sum outcome_b| / n``, averaged over the pairs with entries;
    None when no pair has one.
    """
    stats = np.asarray(stats, np.float64)
    n = stats[:, 0].sum(axis=1) if stats.size else np.zeros(0)
    errors = [float(np.abs(s[1] - s[2]).sum() / c) for s, c in zip(stats, n) if c > 0]
    return float(np.mean(errors)) if errors else None


def reliability_curve(stats: np.ndarray) -> dict[str, list]:
    """A reliability diagram's points from :func:`reliability_statistics`, all pairs pooled.

    Returns:
        ``{"count", "confidence", "observed"}`` per bin: entries, their mean confidence and mean
        outcome (accuracy of top-label pairs, fraction of positives of per-label pairs; None for an
        empty bin).
    """
    pooled = np.asarray(stats, np.float64).reshape(-1, 3, np.shape(stats)[-1]).sum(axis=0)
    n = pooled[0]
    mean = lambda s: [float(v / c) if c > 0 else None for v, c in zip(s, n)]  # noqa: E731
    return {"count": [int(c) for c in n], "confidence": mean(pooled[1]), "observed": mean(pooled[2])}


def fit_calibration(spec: HeadSpec, logits: Array, labels: np.ndarray, folds: int = DEFAULT_FOLDS,
                    min_gain: float = DEFAULT_MIN_GAIN) -> dict[str, Any]:
    """Fits a head's calibration and keeps it only if it helps on validation rows it did not see.

    The calibration is the kind's :meth:`~mtcls.kinds.HeadKind.prior_offset` (or none) and the
    temperature minimising the NLL after it. To decide whether to keep it, the rows are split into
    ``folds`` folds (row ``i`` in fold ``i % folds``); each fold's NLL is measured at the temperature
    fitted on the other folds and at the raw logits. The calibration is kept when the summed
    held-out NLL falls by at least ``min_gain`` (relative). A temperature of 1.05 fitted on a
    validation set where the head is already calibrated does not pass, so it cannot move the
    head's scores by noise.

    Args:
        spec: The head (uncalibrated; ``logits`` are its raw logits).
        logits: (N, *logit shape) raw logits.
        labels: Encoded labels of the same rows.
        folds: Folds of the held-out check (at least 2).
        min_gain: Smallest relative held-out NLL reduction to keep the calibration.

    Returns:
        ``{"temperature", "logit_offset", "kept", "heldout_nll_raw", "heldout_nll_calibrated",
        "heldout_gain"}``; ``temperature`` and ``logit_offset`` are None when the head stays
        uncalibrated (not calibratable, no labels, or not kept). ``fitted_temperature`` is the
        fit on every row, kept or not.
    """
    out: dict[str, Any] = {"temperature": None, "logit_offset": None, "kept": False, "fitted_temperature": None,
                           "heldout_nll_raw": None, "heldout_nll_calibrated": None, "heldout_gain": None}
    if not spec.impl.calibratable:
        return out
    z = _logits(logits)
    y = np.asarray(labels)
    offset = spec.impl.prior_offset(spec)
    fitted = fit_temperature(spec, z, y, offset=offset)
    if fitted is None:
        return out
    out["fitted_temperature"] = fitted
    fold = np.arange(len(z)) % max(int(folds), 2)
    raw = calibrated = n = 0.0
    for k in np.unique(fold):
        held, rest = fold == k, fold != k
        t = fit_temperature(spec, z[rest], y[rest], offset=offset)
        if t is None:
            continue
        total, count = spec.impl.calibration_nll(spec, z[held], y[held])
        raw, n = raw + float(total), n + float(count)
        calibrated += float(spec.impl.calibration_nll(spec, scaled_logits(z[held], t, offset), y[held])[0])
    if raw > 0:
        gain = 1.0 - calibrated / raw
        out.update(heldout_nll_raw=raw / n, heldout_nll_calibrated=calibrated / n, heldout_gain=gain)
        if gain >= min_gain:
            out.update(temperature=fitted, logit_offset=offset, kept=True)
    return out


def calibration_report(spec: HeadSpec, logits: Array, labels: np.ndarray, fit: bool = True,
                       bins: int = DEFAULT_ECE_BINS, folds: int = DEFAULT_FOLDS, min_gain: float = DEFAULT_MIN_GAIN) -> dict[str, Any]:
    """NLL and ECE of one head's validation scores before and after calibration.

    Args:
        spec: The head; "before" is its present scores (its own calibration, usually none).
        logits: Raw logits of the validation rows.
        labels: Their encoded labels.
        fit: Fit a new calibration (:func:`fit_calibration`, which may keep none); otherwise
            "after" is the head's present calibration.
        bins: ECE bins.
        folds: Folds of the held-out check.
        min_gain: Smallest held-out NLL gain to keep a fitted calibration.

    Returns:
        ``{"temperature", "logit_offset", "nll_before", "nll_after", "ece_before", "ece_after"}``
        (``temperature`` None: not calibrated; the metrics are None without labelled entries),
        and with ``fit`` the held-out check of :func:`fit_calibration`.
    """
    z = _logits(logits)
    result = fit_calibration(spec, z, labels, folds, min_gain) if fit else {"temperature": spec.temperature, "logit_offset": spec.logit_offset}
    before = (spec.temperature, spec.logit_offset)
    after = (result["temperature"], result["logit_offset"])
    can = spec.impl.calibratable
    return {
        **result,
        "nll_before": negative_log_likelihood(spec, z, labels, *before) if can else None,
        "nll_after": negative_log_likelihood(spec, z, labels, *after) if can else None,
        "ece_before": expected_calibration_error(spec, head_probabilities(spec, scaled_logits(z, *before)), labels, bins),
        "ece_after": expected_calibration_error(spec, head_probabilities(spec, scaled_logits(z, *after)), labels, bins),
    }
