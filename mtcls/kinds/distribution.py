"""``distribution``: soft targets over K labels, KL divergence, top-1 and a cumulative-probability set."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from mtcls.kinds.base import (SpecFields, 
    IGNORE_INDEX, INVALID_LABEL, HeadKind, LabelError, Stats, confusion, divide, is_missing, ragged_string_column,
    register_kind, zeros,
)
from mtcls.spec_checks import check_probability

DEFAULT_CUMULATIVE_THRESHOLD = 0.9


def cumulative_sets(probs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of labels whose probabilities add up to ``threshold``.

    Args:
        probs: (N, K) probabilities, rows summing to 1.
        threshold: Cumulative probability to reach, in (0, 1).

    Returns:
        ``order`` (N, K): label indices by decreasing probability; ``sizes`` (N,): how many of
        them form the set (at least 1).
    """
    order = np.argsort(-probs, axis=1, kind="stable")
    cum = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    # A tiny tolerance so that [0.5, 0.4, 0.1] reaches 0.9 at two labels despite float rounding.
    sizes = (cum < threshold - 1e-6).sum(axis=1) + 1
    return order, np.minimum(sizes, probs.shape[1])


@register_kind
class Distribution(HeadKind):
    """Labels: (N, K) target probabilities; a row with any negative entry has no label."""

    name = "distribution"
    labels_inferable = False
    own_fields = ("cumulative_threshold",)
    #: Trained on soft targets (KL): its probabilities are the predicted distribution itself, so
    #: no temperature is fitted.
    calibratable = False

    def validate(self, spec: "SpecFields", fail: Callable[[str, str], None]) -> None:
        super().validate(spec, fail)
        if spec.cumulative_threshold is not None:
            spec.cumulative_threshold = check_probability(spec.name, "cumulative_threshold", spec.cumulative_threshold)

    def reliability(self, spec: "SpecFields", probs: np.ndarray, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-label pairs against the target's top label, on labelled rows."""
        y = np.asarray(labels, dtype=np.float64)
        p = np.asarray(probs, dtype=np.float64)
        ok = (y >= 0).all(axis=1)
        return [(p[ok].max(axis=1), (p[ok].argmax(axis=1) == y[ok].argmax(axis=1)).astype(np.float64))]

    def cumulative_threshold(self, spec: "SpecFields") -> float:
        return spec.cumulative_threshold or DEFAULT_CUMULATIVE_THRESHOLD

    def loss_parts(self, spec: "SpecFields", logits: torch.Tensor, labels: torch.Tensor,
                   weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        y = labels.float()
        mask = (y >= 0).all(dim=-1)
        log_p = F.log_softmax(logits.float()[mask], dim=-1)
        total = F.kl_div(log_p, y[mask], reduction="sum")  # KL(target || model) summed over rows
        return total.reshape(1), mask.sum().to(total.dtype).reshape(1)

    def collate(self, spec: "SpecFields", rows: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(rows.astype(np.float32)).reshape(len(rows), spec.num_labels)

    def encode(self, spec: "SpecFields", values: Sequence[Any], on_unknown: str, first_row: int) -> np.ndarray:
        index = {name: i for i, name in enumerate(spec.labels)}
        k = spec.num_labels
        out = np.full((len(values), k), IGNORE_INDEX, dtype=np.float32)
        for i, v in enumerate(values):
            if is_missing(v):
                continue
            if isinstance(v, dict):
                row = np.zeros(k, dtype=np.float64)
                for name, p in v.items():
                    j = self.index_label(spec, index, name, i + first_row, on_unknown)
                    if j == INVALID_LABEL:
                        row[:] = INVALID_LABEL
                        break
                    row[j] = p
            else:
                row = np.asarray(list(v), dtype=np.float64)
                if row.shape != (k,):
                    raise LabelError(f"head {spec.name!r}: row {i + first_row}: expected {k} probabilities, got {len(row)}")
            if (row == INVALID_LABEL).all():
                out[i] = INVALID_LABEL
                continue
            if not np.isfinite(row).all() or (row < 0).any() or abs(row.sum() - 1.0) > 1e-3:
                raise LabelError(
                    f"head {spec.name!r}: row {i + first_row}: soft labels must be non-negative and sum to 1, got {v!r}"
                )
            out[i] = row / row.sum()
        return out

    def decode_labels(self, spec: "SpecFields", encoded: np.ndarray) -> list[Any]:
        return [None if (row < 0).any() else row.tolist() for row in encoded]

    def infer_labels(self, values: Sequence[Any]) -> tuple[set[str], list[str]]:
        raise LabelError("distribution heads need 'labels' in the config (they cannot be inferred)")

    def output_columns(self, spec: "SpecFields") -> list[tuple[str, pa.DataType]]:
        h = spec.name
        return [(f"{h}_label", pa.string()), (f"{h}_score", pa.float32()), (f"{h}_set", pa.list_(pa.string())),
                (f"{h}_probs", pa.list_(pa.float32()))]

    def decode(self, spec: "SpecFields", probs: np.ndarray) -> dict[str, pa.Array]:
        out = super().decode(spec, probs)
        full = np.asarray(probs, dtype=np.float32)
        order, sizes = cumulative_sets(full, self.cumulative_threshold(spec))
        in_set = np.arange(spec.num_labels)[None, :] < sizes[:, None]
        out[f"{spec.name}_set"] = ragged_string_column(spec.labels, in_set, order)
        out[f"{spec.name}_probs"] = out.pop(f"{spec.name}_probs")  # keep the documented column order
        return out

    def empty_statistics(self, spec: "SpecFields") -> Stats:
        return {**super().empty_statistics(spec), "kl_sum": np.zeros((), dtype=np.float64), "set_size_sum": zeros(),
                "in_set": zeros()}

    def statistics(self, spec: "SpecFields", labels: np.ndarray, probs: np.ndarray) -> Stats:
        stats = self.empty_statistics(spec)
        y = np.asarray(labels, dtype=np.float64)
        probs = np.asarray(probs, dtype=np.float64)
        invalid = (y == INVALID_LABEL).any(axis=1)
        missing = (y == IGNORE_INDEX).any(axis=1) & ~invalid
        ok = ~(invalid | missing)
        t, p = y[ok], probs[ok]
        true_top = t.argmax(axis=1)
        stats["confusion"] += confusion(true_top, p.argmax(axis=1), spec.num_labels)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(t > 0, t * (np.log(t) - np.log(np.clip(p, 1e-12, None))), 0.0)
        stats["kl_sum"] = stats["kl_sum"] + terms.sum()
        order, sizes = cumulative_sets(p, self.cumulative_threshold(spec))
        in_set = (order == true_top[:, None]) & (np.arange(spec.num_labels)[None, :] < sizes[:, None])
        stats["set_size_sum"] += int(sizes.sum())
        stats["in_set"] += int(in_set.any(axis=1).sum())
        stats["unlabelled"] += int(missing.sum())
        stats["invalid"] += int(invalid.sum())
        return stats

    def report(self, spec: "SpecFields", stats: Stats) -> dict[str, Any]:
        rep = super().report(spec, stats)
        n = rep["rows_labelled"]
        rep["top1_accuracy"] = rep["accuracy"]
        rep["kl_divergence"] = float(stats["kl_sum"] / n) if n else 0.0
        rep["mean_set_size"] = float(divide(stats["set_size_sum"], n))
        rep["set_coverage"] = float(divide(stats["in_set"], n))
        rep["cumulative_threshold"] = self.cumulative_threshold(spec)
        return rep

    def markdown(self, name: str, rep: dict[str, Any]) -> list[str]:
        lines = super().markdown(name, rep)
        extra = [f"- KL divergence (mean): {rep['kl_divergence']:.4f}", f"- Top-1 accuracy: {rep['top1_accuracy']:.4f}",
                 f"- Cumulative threshold {rep['cumulative_threshold']}: mean set size {rep['mean_set_size']:.3f}, "
                 f"true label in set {rep['set_coverage'] * 100:.2f}%"]
        return lines[:3] + extra + lines[3:]
