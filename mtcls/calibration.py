"""Temperature scaling: calibrated scores from one scalar per head (issue 14).

A head with ``temperature`` T outputs the kind's probabilities of ``logits / T`` (softmax for
multiclass and grouped heads, sigmoid for binary and multilabel heads). T > 0 keeps the order of
each row's logits, so the arg-max of single-choice heads never changes; only how confident the
scores are. T is fitted on labelled validation data by minimising the kind's negative
log-likelihood (:meth:`mtcls.kinds.HeadKind.calibration_nll`). ``distribution`` heads are not
calibrated (``calibratable = False``): they are trained on soft targets, and their probabilities
are the predicted distribution itself.

Calibration applies to the scores a model outputs (:class:`mtcls.inference.InferenceEngine`), not
inside the model: :meth:`mtcls.MultiTaskModel.forward_heads` still feeds later heads the
uncalibrated probabilities they were trained on (``inputs_from``).
"""

from __future__ import annotations

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


def calibrated_probabilities(spec: HeadSpec, logits: torch.Tensor) -> torch.Tensor:
    """The head's output scores: its kind's probabilities of ``logits / spec.temperature``.

    With ``temperature`` None this is exactly :func:`mtcls.modeling.head_probabilities`.
    """
    if spec.temperature is None:
        return head_probabilities(spec, logits)
    return head_probabilities(spec, logits / spec.temperature)


def _logits(logits: Array) -> torch.Tensor:
    return torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).detach().float().cpu()


def negative_log_likelihood(spec: HeadSpec, logits: Array, labels: np.ndarray, temperature: Optional[float] = None) -> Optional[float]:
    """Mean NLL of the labelled entries of one head at a temperature (None: 1), or None without labels."""
    z = _logits(logits)
    total, count = spec.impl.calibration_nll(spec, z if temperature is None else z / temperature, labels)
    return float(total / count) if float(count) > 0 else None


def fit_temperature(spec: HeadSpec, logits: Array, labels: np.ndarray, bounds: tuple[float, float] = (MIN_TEMPERATURE, MAX_TEMPERATURE),
                    tol: float = 1e-4) -> Optional[float]:
    """The temperature minimising the head's validation NLL, by golden-section search on log T.

    The NLL of softmax and sigmoid likelihoods is convex in 1/T, hence unimodal in log T, so the
    search finds the minimum inside ``bounds`` (or the nearer bound).

    Args:
        spec: The head (its own ``temperature`` is ignored: ``logits`` are the raw logits).
        logits: (N, *logit shape) raw logits of labelled and unlabelled rows.
        labels: The encoded labels of those rows (missing and invalid labels are left out).
        bounds: Smallest and largest temperature.
        tol: Stops when the bracket on log T is narrower than this.

    Returns:
        The temperature, or None when the kind is not calibrated or no entry has a label.
    """
    if not spec.impl.calibratable:
        return None
    z = _logits(logits)
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


def calibration_report(spec: HeadSpec, logits: Array, labels: np.ndarray, fit: bool = True,
                       bins: int = DEFAULT_ECE_BINS) -> dict[str, Any]:
    """NLL and ECE of one head's validation scores before and after temperature scaling.

    Args:
        spec: The head; "before" is its present scores (its own ``temperature``, usually None).
        logits: Raw logits of the validation rows.
        labels: Their encoded labels.
        fit: Fit a new temperature; otherwise "after" is the head's present temperature.
        bins: ECE bins.

    Returns:
        ``{"temperature", "nll_before", "nll_after", "ece_before", "ece_after"}`` (``temperature``
        None: not calibrated; the metrics are None without labelled entries).
    """
    z = _logits(logits)
    temperature = fit_temperature(spec, z, labels) if fit else spec.temperature
    before, after = spec.temperature, temperature
    return {
        "temperature": temperature,
        "nll_before": negative_log_likelihood(spec, z, labels, before) if spec.impl.calibratable else None,
        "nll_after": negative_log_likelihood(spec, z, labels, after) if spec.impl.calibratable else None,
        "ece_before": expected_calibration_error(spec, head_probabilities(spec, z if before is None else z / before), labels, bins),
        "ece_after": expected_calibration_error(spec, head_probabilities(spec, z if after is None else z / after), labels, bins),
    }
