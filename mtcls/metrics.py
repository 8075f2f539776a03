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

from mtcls.decoding import DEFAULT_CUMULATIVE_THRESHOLD, cumulative_sets, predict_indices
from mtcls.heads import HeadSpec
from mtcls.losses import IGNORE_INDEX

Stats = dict[str, np.ndarray]


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k).astype(np.int64)


def empty_statistics(spec: HeadSpec) -> Stats:
    """Zero statistics for a head: the identity of :func:`merge_statistics`."""
    k = spec.num_labels
    z = lambda *shape: np.zeros(shape, dtype=np.int64)  # noqa: E731
    if spec.kind in ("binary", "multiclass"):
        return {"confusion": z(k, k), "unlabelled": z(), "invalid": z()}
    if spec.kind == "multilabel":
        return {"tp": z(k), "fp": z(k), "fn": z(k), "tn": z(k), "exact": z(), "rows": z(), "unlabelled": z(), "invalid": z()}
    if spec.kind == "grouped":
        g = spec.num_groups
        return {"confusion": z(g, k, k), "unlabelled": z(g), "invalid": z(g)}
    return {
        "confusion": z(k, k), "unlabelled": z(), "invalid": z(),
        "kl_sum": np.zeros((), dtype=np.float64), "set_size_sum": z(), "in_set": z(),
    }


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
    stats = empty_statistics(spec)
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    k = spec.num_labels
    if spec.kind in ("binary", "multiclass"):
        y = labels.astype(np.int64).reshape(-1)
        pred = predict_indices(spec, probs)
        ok = y >= 0
        stats["confusion"] += _confusion(y[ok], pred[ok], k)
        stats["unlabelled"] += int((y == IGNORE_INDEX).sum())
        stats["invalid"] += int(((y < 0) & (y != IGNORE_INDEX)).sum())
    elif spec.kind == "multilabel":
        y = labels.astype(np.float64)
        invalid_rows = (y == -1).any(axis=1)
        missing_rows = (y == IGNORE_INDEX).any(axis=1) & ~invalid_rows
        ok = ~(invalid_rows | missing_rows)
        t = y[ok] > 0.5
        p = predict_indices(spec, probs)[ok]
        stats["tp"] += (t & p).sum(axis=0)
        stats["fp"] += (~t & p).sum(axis=0)
        stats["fn"] += (t & ~p).sum(axis=0)
        stats["tn"] += (~t & ~p).sum(axis=0)
        stats["exact"] += int((t == p).all(axis=1).sum())
        stats["rows"] += int(ok.sum())
        stats["unlabelled"] += int(missing_rows.sum())
        stats["invalid"] += int(invalid_rows.sum())
    elif spec.kind == "grouped":
        y = labels.astype(np.int64)
        pred = predict_indices(spec, probs)
        for g in range(spec.num_groups):
            ok = y[:, g] >= 0
            stats["confusion"][g] += _confusion(y[ok, g], pred[ok, g], k)
            stats["unlabelled"][g] += int((y[:, g] == IGNORE_INDEX).sum())
            stats["invalid"][g] += int(((y[:, g] < 0) & (y[:, g] != IGNORE_INDEX)).sum())
    else:
        y = labels.astype(np.float64)
        invalid = (y == -1).any(axis=1)
        missing = (y == IGNORE_INDEX).any(axis=1) & ~invalid
        ok = ~(invalid | missing)
        t, p = y[ok], probs[ok]
        true_top = t.argmax(axis=1)
        stats["confusion"] += _confusion(true_top, p.argmax(axis=1), k)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(t > 0, t * (np.log(t) - np.log(np.clip(p, 1e-12, None))), 0.0)
        stats["kl_sum"] = stats["kl_sum"] + terms.sum()
        order, sizes = cumulative_sets(p, spec.cumulative_threshold or DEFAULT_CUMULATIVE_THRESHOLD)
        in_set = (order == true_top[:, None]) & (np.arange(k)[None, :] < sizes[:, None])
        stats["set_size_sum"] += int(sizes.sum())
        stats["in_set"] += int(in_set.any(axis=1).sum())
        stats["unlabelled"] += int(missing.sum())
        stats["invalid"] += int(invalid.sum())
    return stats


def merge_statistics(a: Stats, b: Stats) -> Stats:
    """Adds two shards' statistics of the same head."""
    if set(a) != set(b):
        raise ValueError(f"cannot merge statistics with different fields: {sorted(a)} vs {sorted(b)}")
    return {key: a[key] + b[key] for key in a}


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den != 0)
    return out


def prf_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Per-label and averaged precision/recall/F1 from per-label counts (scikit-learn's formulas).

    Args:
        tp, fp, fn: Per-label true positives, false positives, false negatives.
        labels: Label names, in the same order.

    Returns:
        ``per_label`` (precision, recall, f1, support per label) and ``macro``, ``micro``,
        ``weighted`` averages.
    """
    support = tp + fn
    precision, recall = _divide(tp, tp + fp), _divide(tp, support)
    f1 = _divide(2 * tp, support + tp + fp)
    mtp, mfp, mfn = tp.sum(), fp.sum(), fn.sum()
    micro_p, micro_r = float(_divide(mtp, mtp + mfp)), float(_divide(mtp, mtp + mfn))
    micro_f1 = float(_divide(2 * mtp, 2 * mtp + mfp + mfn))
    weights = support if support.sum() > 0 else None
    return {
        "per_label": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(labels)
        },
        "macro": {"precision": float(np.average(precision)), "recall": float(np.average(recall)), "f1": float(np.average(f1))},
        "micro": {"precision": micro_p, "recall": micro_r, "f1": micro_f1},
        "weighted": {
            "precision": float(np.average(precision, weights=weights)),
            "recall": float(np.average(recall, weights=weights)),
            "f1": float(np.average(f1, weights=weights)),
        },
        "support": int(support.sum()),
    }


def confusion_report(confusion: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, precision/recall/F1 and the confusion matrix from a (K, K) [true, pred] matrix."""
    tp = np.diag(confusion)
    report = prf_from_counts(tp, confusion.sum(axis=0) - tp, confusion.sum(axis=1) - tp, labels)
    total = int(confusion.sum())
    report["accuracy"] = float(_divide(tp.sum(), total))
    report["confusion_matrix"] = confusion.tolist()
    return report


def head_report(spec: HeadSpec, stats: Stats) -> dict[str, Any]:
    """Every metric of a head's kind, from merged statistics.

    Args:
        spec: The head.
        stats: Statistics from :func:`head_statistics`, merged over all shards.

    Returns:
        A JSON-serialisable report; ``rows_labelled``, ``rows_unlabelled`` and ``rows_invalid``
        (labels outside the head's set) always present; ``macro_f1`` is the headline number.
    """
    labels = list(spec.labels)
    base: dict[str, Any] = {"kind": spec.kind, "labels": labels}
    if spec.kind in ("binary", "multiclass", "distribution"):
        rep = confusion_report(stats["confusion"], labels)
        n = int(stats["confusion"].sum())
        base.update(rows_labelled=n, rows_unlabelled=int(stats["unlabelled"]), rows_invalid=int(stats["invalid"]))
        if spec.kind == "distribution":
            rep["top1_accuracy"] = rep["accuracy"]
            rep["kl_divergence"] = float(stats["kl_sum"] / n) if n else 0.0
            rep["mean_set_size"] = float(_divide(stats["set_size_sum"], n))
            rep["set_coverage"] = float(_divide(stats["in_set"], n))
            rep["cumulative_threshold"] = spec.cumulative_threshold or DEFAULT_CUMULATIVE_THRESHOLD
    elif spec.kind == "multilabel":
        rep = prf_from_counts(stats["tp"], stats["fp"], stats["fn"], labels)
        n = int(stats["rows"])
        rep["subset_accuracy"] = float(_divide(stats["exact"], n))
        rep["hamming_loss"] = float(_divide((stats["fp"] + stats["fn"]).sum(), n * len(labels)))
        for i, name in enumerate(labels):
            rep["per_label"][name].update(tp=int(stats["tp"][i]), fp=int(stats["fp"][i]), fn=int(stats["fn"][i]), tn=int(stats["tn"][i]))
        base.update(rows_labelled=n, rows_unlabelled=int(stats["unlabelled"]), rows_invalid=int(stats["invalid"]))
    else:
        groups = {g: confusion_report(stats["confusion"][i], labels) for i, g in enumerate(spec.groups or [])}
        rep = {
            "groups": groups,
            "overall": confusion_report(stats["confusion"].sum(axis=0), labels),
            "mean_group_macro_f1": float(np.mean([r["macro"]["f1"] for r in groups.values()])),
        }
        rep["macro"] = rep["overall"]["macro"]
        base.update(
            rows_labelled={g: int(stats["confusion"][i].sum()) for i, g in enumerate(spec.groups or [])},
            rows_unlabelled={g: int(stats["unlabelled"][i]) for i, g in enumerate(spec.groups or [])},
            rows_invalid={g: int(stats["invalid"][i]) for i, g in enumerate(spec.groups or [])},
        )
    base.update(rep)
    base["macro_f1"] = float(rep["macro"]["f1"])
    return base


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
