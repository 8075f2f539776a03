"""``multilabel``: K independent labels, sigmoid each, BCE per label, a threshold per label."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from mtcls.kinds.base import (SpecFields, 
    IGNORE_INDEX, INVALID_LABEL, HeadKind, LabelError, Stats, divide, float_rows, is_missing, list_column,
    per_label_reliability, ragged_string_column, register_kind, rows_line, zeros,
)
from mtcls.kinds.formulas import prf_from_counts
from mtcls.spec_checks import check_positive_list, check_probability


@register_kind
class Multilabel(HeadKind):
    """Every label at or above its threshold. Labels: (N, K) 0/1, -100 = none, -1 = outside the set."""

    name = "multilabel"
    min_labels = 1
    weight_field = "pos_weight"
    tunable = True
    tuned_in_training = True
    own_fields = ("thresholds",)

    def validate(self, spec: "SpecFields", fail: Callable[[str, str], None]) -> None:
        super().validate(spec, fail)
        t = spec.thresholds
        if isinstance(t, (list, tuple)):
            if len(t) != spec.num_labels:
                fail("thresholds", f"needs one threshold per label ({spec.num_labels}), got {len(t)}")
            spec.thresholds = [check_probability(spec.name, "thresholds", v) for v in t]
        elif t is not None:
            spec.thresholds = check_probability(spec.name, "thresholds", t)

    def check_weights(self, spec: "SpecFields", value: Any) -> Any:
        return check_positive_list(spec.name, "pos_weight", value, spec.num_labels)

    def thresholds(self, spec: "SpecFields") -> list[float]:
        t = 0.5 if spec.thresholds is None else spec.thresholds
        return [float(v) for v in t] if isinstance(t, list) else [float(t)] * spec.num_labels

    def with_thresholds(self, spec: "SpecFields", thresholds: list[float]) -> "SpecFields":
        return dataclasses.replace(spec, thresholds=[float(t) for t in thresholds])

    def resolve_weights(self, spec: "SpecFields", counts: list[int], total: int, sqrt: bool) -> Any:
        weights = [float(total - c) / c if 0 < c < total else 1.0 for c in counts]
        return [w ** 0.5 for w in weights] if sqrt else weights

    def probabilities(self, spec: "SpecFields", logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def loss_parts(self, spec: "SpecFields", logits: torch.Tensor, labels: torch.Tensor,
                   weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        y = labels.float()
        mask = y != IGNORE_INDEX
        per_entry = F.binary_cross_entropy_with_logits(logits.float(), y.clamp(min=0.0), pos_weight=weights,
                                                       reduction="none")  # (B, K)
        total = (per_entry * mask).sum()
        return total.reshape(1), mask.sum().to(total.dtype).reshape(1)

    def collate(self, spec: "SpecFields", rows: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(rows.astype(np.float32)).reshape(len(rows), spec.num_labels)

    def encode(self, spec: "SpecFields", values: Sequence[Any], on_unknown: str, first_row: int) -> np.ndarray:
        index = {name: i for i, name in enumerate(spec.labels)}
        out = np.full((len(values), spec.num_labels), IGNORE_INDEX, dtype=np.float32)
        for i, v in enumerate(values):
            if is_missing(v):
                continue
            if isinstance(v, str) or not hasattr(v, "__iter__"):
                raise LabelError(f"head {spec.name!r}: row {i + first_row}: expected a list of label names, got {v!r}")
            out[i] = 0.0
            for name in v:
                j = self.index_label(spec, index, name, i + first_row, on_unknown)
                if j == INVALID_LABEL:
                    out[i] = INVALID_LABEL
                    break
                out[i, j] = 1.0
        return out

    def decode_labels(self, spec: "SpecFields", encoded: np.ndarray) -> list[Any]:
        return [None if (row < 0).any() else [spec.labels[j] for j in np.flatnonzero(row > 0.5)] for row in encoded]

    def infer_labels(self, values: Sequence[Any]) -> tuple[set[str], list[str]]:
        return {str(x) for v in values if not is_missing(v) for x in v}, []

    def label_counts(self, spec: "SpecFields", encoded: np.ndarray) -> tuple[list[int], int]:
        rows = encoded[(encoded >= 0).all(axis=1)]
        return [int(c) for c in rows.sum(axis=0)], int(len(rows))

    def predict(self, spec: "SpecFields", probs: np.ndarray) -> np.ndarray:
        return probs >= np.asarray(self.thresholds(spec), dtype=probs.dtype)

    def output_columns(self, spec: "SpecFields") -> list[tuple[str, pa.DataType]]:
        return [(f"{spec.name}_labels", pa.list_(pa.string())), (f"{spec.name}_probs", pa.list_(pa.float32()))]

    def decode(self, spec: "SpecFields", probs: np.ndarray) -> dict[str, pa.Array]:
        probs = np.asarray(probs, dtype=np.float32)
        return {f"{spec.name}_labels": ragged_string_column(spec.labels, self.predict(spec, probs)),
                f"{spec.name}_probs": list_column(probs, spec.num_labels)}

    def probabilities_from_columns(self, spec: "SpecFields", table: Any) -> np.ndarray:
        return float_rows(table.column(f"{spec.name}_probs"), spec.num_labels)

    def prediction_mix(self, spec: "SpecFields", probs: np.ndarray) -> np.ndarray:
        """Rows predicted positive per label, (K,)."""
        return self.predict(spec, probs).sum(axis=0).astype(np.int64)

    def decision_scores(self, spec: "SpecFields", probs: np.ndarray) -> np.ndarray:
        """Each row's highest label probability."""
        return np.asarray(probs, dtype=np.float64).max(axis=1)

    def mix_distributions(self, spec: "SpecFields", mix: np.ndarray, rows: int) -> dict[str, np.ndarray]:
        """Per label, the (positive, negative) shares of rows."""
        rates = divide(mix, rows)
        return {label: np.array([r, 1.0 - r]) for label, r in zip(spec.labels, rates)}

    def mix_summary(self, spec: "SpecFields", mix: np.ndarray, rows: int) -> dict[str, Any]:
        """``{label: share of rows predicted positive}``."""
        return {label: round(float(v), 6) for label, v in zip(spec.labels, divide(mix, rows))}

    def empty_statistics(self, spec: "SpecFields") -> Stats:
        k = spec.num_labels
        return {"tp": zeros(k), "fp": zeros(k), "fn": zeros(k), "tn": zeros(k), "exact": zeros(), "rows": zeros(),
                "unlabelled": zeros(), "invalid": zeros()}

    def statistics(self, spec: "SpecFields", labels: np.ndarray, probs: np.ndarray) -> Stats:
        stats = self.empty_statistics(spec)
        y = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
        invalid_rows = (y == INVALID_LABEL).any(axis=1)
        missing_rows = (y == IGNORE_INDEX).any(axis=1) & ~invalid_rows
        ok = ~(invalid_rows | missing_rows)
        t = y[ok] > 0.5
        p = self.predict(spec, np.asarray(probs, dtype=np.float64))[ok]
        stats["tp"] += (t & p).sum(axis=0)
        stats["fp"] += (~t & p).sum(axis=0)
        stats["fn"] += (t & ~p).sum(axis=0)
        stats["tn"] += (~t & ~p).sum(axis=0)
        stats["exact"] += int((t == p).all(axis=1).sum())
        stats["rows"] += int(ok.sum())
        stats["unlabelled"] += int(missing_rows.sum())
        stats["invalid"] += int(invalid_rows.sum())
        return stats

    def report(self, spec: "SpecFields", stats: Stats) -> dict[str, Any]:
        labels = list(spec.labels)
        rep = prf_from_counts(stats["tp"], stats["fp"], stats["fn"], labels)
        n = int(stats["rows"])
        rep["subset_accuracy"] = float(divide(stats["exact"], n))
        rep["hamming_loss"] = float(divide((stats["fp"] + stats["fn"]).sum(), n * len(labels)))
        for i, name in enumerate(labels):
            rep["per_label"][name].update(tp=int(stats["tp"][i]), fp=int(stats["fp"][i]), fn=int(stats["fn"][i]),
                                          tn=int(stats["tn"][i]))
        rep.update(rows_labelled=n, rows_unlabelled=int(stats["unlabelled"]), rows_invalid=int(stats["invalid"]))
        return rep

    def markdown(self, name: str, rep: dict[str, Any]) -> list[str]:
        from mtcls.report_text import class_table, pct

        return [f"- Subset accuracy: {pct(rep['subset_accuracy'])}", f"- Hamming loss: {rep['hamming_loss']:.4f}",
                f"- Micro F1: {pct(rep['micro']['f1'])}", f"- Macro F1: {pct(rep['macro']['f1'])}", rows_line(rep),
                "", "Per label:", "", *class_table(rep)]

    def plot_matrix(self, rep: dict[str, Any]) -> tuple[np.ndarray, list[str], list[str], str, str]:
        m = np.array([[row["tp"], row["fn"], row["fp"], row["tn"]] for row in rep["per_label"].values()])
        return m, list(rep["per_label"]), ["TP", "FN", "FP", "TN"], "label", ""

    def calibration_nll(self, spec: "SpecFields", logits: torch.Tensor, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.collate(spec, np.asarray(labels)).to(logits.device)
        y[(y < 0).any(dim=1)] = IGNORE_INDEX  # a row with a missing or invalid label is left out, as in statistics
        sums, denominators = self.loss_parts(spec, logits, y, None)
        return sums.sum(), denominators.sum()

    def reliability(self, spec: "SpecFields", probs: np.ndarray, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        return per_label_reliability(probs, labels)
