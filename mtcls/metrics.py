"""Mergeable evaluation statistics and the report formulas built on them (numpy only).

Evaluation is split in two so that it runs across shards exactly:

1. :func:`head_statistics` turns one shard's labels and probabilities into integer counts (confusion
   matrices, per-label tp/fp/fn/tn) and float sums. Statistics of two shards merge by addition
   (:func:`merge_statistics`), so the statistics of N shards equal those of the whole set.
2. :func:`head_report` computes every metric from the merged statistics with the same formulas as
   scikit-learn (precision tp/(tp+fp), recall tp/(tp+fn), F1 2tp/(2tp+fp+fn), 0 where undefined).

Labels use the layouts of :mod:`mtcls.losses` (``-100`` = no label).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mtcls.heads import HeadSpec
from mtcls.kinds.formulas import confusion_report, prf_from_counts

Stats = dict[str, np.ndarray]


def empty_statistics(spec: HeadSpec) -> Stats:
    """Zero statistics for a head: the identity of :func:`merge_statistics`."""
    return spec.impl.empty_statistics(spec)


def head_statistics(spec: HeadSpec, labels: np.ndarray, probs: np.ndarray) -> Stats:
    """Counts for one shard of one head.

    Args:
        spec: The head.
        labels: Encoded labels ((N,) binary/multiclass, (N, K) multilabel/distribution,
            (N, G) grouped); ``-100`` marks a missing label, ``-1`` a label outside the head's set
            (counted under ``invalid``, not scored).
        probs: The model's probabilities for the same rows ((N, 1) binary, (N, G, K) grouped,
            (N, K) otherwise).

    Returns:
        A dict of arrays that merge by addition.
    """
    return spec.impl.statistics(spec, np.asarray(labels), np.asarray(probs, dtype=np.float64))


def merge_statistics(a: Stats, b: Stats) -> Stats:
    """Adds two shards' statistics of the same head."""
    if set(a) != set(b):
        raise ValueError(f"cannot merge statistics with different fields: {sorted(a)} vs {sorted(b)}")
    return {key: a[key] + b[key] for key in a}


def head_report(spec: HeadSpec, stats: Stats) -> dict[str, Any]:
    """Every metric of a head's kind, from merged statistics.

    Args:
        spec: The head.
        stats: Statistics from :func:`head_statistics`, merged over all shards.

    Returns:
        A JSON-serialisable report; ``rows_labelled``, ``rows_unlabelled`` and ``rows_invalid``
        (labels outside the head's set) always present; ``macro_f1`` is the headline number.
    """
    report: dict[str, Any] = {"kind": spec.kind, "labels": list(spec.labels)}
    report.update(spec.impl.report(spec, stats))
    report["macro_f1"] = float(report["macro"]["f1"])
    return report


def statistics_to_lists(stats: Stats) -> dict[str, Any]:
    """Statistics as JSON-able nested lists."""
    return {k: v.tolist() for k, v in stats.items()}


def statistics_from_lists(spec: HeadSpec, data: dict[str, Any]) -> Stats:
    """Inverse of :func:`statistics_to_lists`, keeping each field's dtype."""
    empty = empty_statistics(spec)
    return {k: np.asarray(data[k], dtype=v.dtype).reshape(v.shape) for k, v in empty.items()}


__all__ = [
    "empty_statistics",
    "head_statistics",
    "merge_statistics",
    "head_report",
    "confusion_report",
    "prf_from_counts",
    "statistics_to_lists",
    "statistics_from_lists",
]
