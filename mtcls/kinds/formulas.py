"""The report formulas on counts (numpy only): safe division, precision/recall/F1, confusion reports.

The kinds build their reports with them and :mod:`mtcls.metrics` exports them; they live here,
below both, so that the kinds never import the metrics module (which imports the head specs).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def divide(num: Any, den: Any) -> np.ndarray:
    """Element-wise ``num / den`` with 0 where ``den`` is 0 (scikit-learn's convention)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape)
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
    precision, recall = divide(tp, tp + fp), divide(tp, support)
    f1 = divide(2 * tp, support + tp + fp)
    mtp, mfp, mfn = tp.sum(), fp.sum(), fn.sum()
    micro_p, micro_r = float(divide(mtp, mtp + mfp)), float(divide(mtp, mtp + mfn))
    micro_f1 = float(divide(2 * mtp, 2 * mtp + mfp + mfn))
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
    report["accuracy"] = float(divide(tp.sum(), total))
    report["confusion_matrix"] = confusion.tolist()
    return report
