"""Decision-threshold tuning for binary and multilabel heads, from mergeable histograms.

Per label, the probabilities of labelled positives and negatives are counted in ``bins`` equal-width
bins. Histograms of shards add up; from the merged counts, the threshold at each bin edge gives exact
tp/fp/fn for "predict positive when p >= edge", and the edge with the best F1 is chosen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mtcls.heads import HeadSpec
from mtcls.kinds import get_kind, kind_names

DEFAULT_BINS = 200


def threshold_histograms(spec: HeadSpec, labels: np.ndarray, probs: np.ndarray,
                         bins: int = DEFAULT_BINS) -> dict[str, np.ndarray]:
    """Counts of positive and negative examples per probability bin, per label.

    Args:
        spec: A binary or multilabel head.
        labels: Encoded labels ((N,) binary 0/1, (N, K) multilabel 0/1; negative = missing/invalid).
        probs: (N, 1) binary positive probability or (N, K) multilabel probabilities.
        bins: Number of equal-width bins over [0, 1].

    Returns:
        ``{"pos": (K, bins), "neg": (K, bins)}`` int64 counts (K = 1 for binary).
    """
    if not spec.impl.tunable:
        tunable = " and ".join(k for k in kind_names() if get_kind(k).tunable)
        raise ValueError(f"head {spec.name!r}: threshold tuning applies to {tunable} heads, not {spec.kind}")
    y = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
    p = np.asarray(probs, dtype=np.float64).reshape(len(labels), -1)
    k = p.shape[1]
    pos = np.zeros((k, bins), dtype=np.int64)
    neg = np.zeros((k, bins), dtype=np.int64)
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    for j in range(k):
        ok = y[:, j] >= 0
        pos[j] += np.bincount(idx[ok & (y[:, j] > 0.5), j], minlength=bins)
        neg[j] += np.bincount(idx[ok & (y[:, j] < 0.5), j], minlength=bins)
    return {"pos": pos, "neg": neg}


def best_thresholds(spec: HeadSpec, hist: dict[str, np.ndarray]) -> dict[str, Any]:
    """The per-label threshold (a bin edge in (0, 1)) maximising F1, with the F1 reached.

    Args:
        spec: The head.
        hist: Merged :func:`threshold_histograms`.

    Returns:
        ``{"thresholds": [...], "f1": [...], "current_f1": [...]}`` in label order; binary heads
        have one entry. ``current_f1`` is F1 at the head's present thresholds, rounded to a bin edge.
        A label without a single positive example has no F1 to maximise (every threshold scores
        0): it keeps its present threshold and is listed in ``no_positives``.
    """
    pos, neg = hist["pos"], hist["neg"]
    k, bins = pos.shape
    edges = np.arange(1, bins) / bins  # candidate thresholds strictly inside (0, 1)
    # tp(e) = positives with p >= e: a reversed cumulative sum from bin e*bins upwards.
    tp = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1][:, 1:]
    fp = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1][:, 1:]
    fn = pos.sum(axis=1, keepdims=True) - tp
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros(tp.shape, dtype=np.float64), where=denom > 0)
    best = f1.argmax(axis=1)
    present = [float(t) for t in spec.label_thresholds()]
    current = np.clip(np.rint(np.asarray(present) * bins).astype(int) - 1, 0, bins - 2)
    current = np.broadcast_to(current, (k,))
    no_positives = pos.sum(axis=1) == 0
    labels = spec.impl.threshold_labels(spec)
    return {
        "labels": labels,
        "thresholds": [present[j] if no_positives[j] else float(edges[b]) for j, b in enumerate(best)],
        "f1": [float(f1[j, b]) for j, b in enumerate(best)],
        "current_thresholds": present,
        "current_f1": [float(f1[j, c]) for j, c in enumerate(current)],
        "no_positives": [labels[j] for j in np.flatnonzero(no_positives)],
    }
