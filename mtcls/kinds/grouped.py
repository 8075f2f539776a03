"""``grouped``: G groups, each a K-way choice (e.g. 12 topics x 4 sentiments); mean of per-group losses."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from mtcls.kinds.base import (SpecFields, 
    IGNORE_INDEX, HeadKind, LabelError, Stats, confusion, divide, float_rows, is_missing, list_column, register_kind,
    string_column, zeros,
)
from mtcls.kinds.formulas import confusion_report
from mtcls.kinds.multiclass import weighted_cross_entropy_parts
from mtcls.spec_checks import check_positive_list


@register_kind
class Grouped(HeadKind):
    """Arg-max per group. Logits (N, G, K); labels (N, G) label index, -100 = none for that group."""

    name = "grouped"
    has_groups = True
    weight_field = "class_weights"

    def check_weights(self, spec: "SpecFields", value: Any) -> Any:
        return check_positive_list(spec.name, "class_weights", value, spec.num_labels)

    def num_logits(self, spec: "SpecFields") -> int:
        return spec.num_groups * spec.num_labels

    def logit_shape(self, spec: "SpecFields") -> tuple[int, ...]:
        return (spec.num_groups, spec.num_labels)

    def loss_parts(self, spec: "SpecFields", logits: torch.Tensor, labels: torch.Tensor,
                   weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        y = labels.long()  # (B, G)
        parts = [weighted_cross_entropy_parts(logits[:, g, :], y[:, g], weights) for g in range(logits.shape[1])]
        return torch.cat([s for s, _ in parts]), torch.cat([d for _, d in parts])

    def collate(self, spec: "SpecFields", rows: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(rows.astype(np.float32)).reshape(len(rows), spec.num_groups).long()

    def encode(self, spec: "SpecFields", values: Sequence[Any], on_unknown: str, first_row: int) -> np.ndarray:
        index = {name: i for i, name in enumerate(spec.labels)}
        groups = {g: j for j, g in enumerate(spec.groups or [])}
        out = np.full((len(values), len(groups)), IGNORE_INDEX, dtype=np.int64)
        for i, v in enumerate(values):
            if is_missing(v):
                continue
            for g, label in v.items() if isinstance(v, dict) else v:
                if g not in groups:
                    raise LabelError(f"head {spec.name!r}: row {i + first_row}: unknown group {g!r}; groups: {spec.groups}")
                if not is_missing(label):
                    out[i, groups[g]] = self.index_label(spec, index, label, i + first_row, on_unknown)
        return out

    def decode_labels(self, spec: "SpecFields", encoded: np.ndarray) -> list[Any]:
        return [{g: (spec.labels[j] if j >= 0 else None) for g, j in zip(spec.groups or [], row.tolist())} for row in encoded]

    def infer_labels(self, values: Sequence[Any]) -> tuple[set[str], list[str]]:
        labels: set[str] = set()
        groups: list[str] = []
        for v in values:
            if is_missing(v):
                continue
            for g, label in v.items() if isinstance(v, dict) else v:
                if g not in groups:
                    groups.append(g)
                if not is_missing(label):
                    labels.add(str(label))
        return labels, groups

    def output_columns(self, spec: "SpecFields") -> list[tuple[str, pa.DataType]]:
        cols: list[tuple[str, pa.DataType]] = []
        for g in spec.groups or []:
            cols += [(f"{spec.name}_{g}_label", pa.string()), (f"{spec.name}_{g}_score", pa.float32())]
        return cols + [(f"{spec.name}_probs", pa.list_(pa.list_(pa.float32())))]

    def decode(self, spec: "SpecFields", probs: np.ndarray) -> dict[str, pa.Array]:
        probs = np.asarray(probs, dtype=np.float32)  # (N, G, K)
        idx = self.predict(spec, probs)
        out: dict[str, pa.Array] = {}
        for g, group in enumerate(spec.groups or []):
            out[f"{spec.name}_{group}_label"] = string_column(spec.labels, idx[:, g])
            out[f"{spec.name}_{group}_score"] = pa.array(np.take_along_axis(probs[:, g, :], idx[:, g:g + 1], axis=1)[:, 0])
        inner = list_column(probs.reshape(-1, spec.num_labels), spec.num_labels)
        offsets = pa.array(np.arange(0, len(inner) + 1, spec.num_groups, dtype=np.int32))
        out[f"{spec.name}_probs"] = pa.ListArray.from_arrays(offsets, inner)
        return out

    def probabilities_from_columns(self, spec: "SpecFields", table: Any) -> np.ndarray:
        column = table.column(f"{spec.name}_probs").combine_chunks()
        flat = float_rows(column.flatten(), spec.num_labels) if len(column) else np.zeros((0, spec.num_labels))
        return flat.reshape(len(column), spec.num_groups, spec.num_labels)

    def prediction_mix(self, spec: "SpecFields", probs: np.ndarray) -> np.ndarray:
        """Rows per predicted label in each group, (G, K)."""
        pred = self.predict(spec, np.asarray(probs))
        k = spec.num_labels
        return np.stack([np.bincount(pred[:, g], minlength=k) for g in range(spec.num_groups)]).astype(np.int64)

    def decision_scores(self, spec: "SpecFields", probs: np.ndarray) -> np.ndarray:
        """The top probability of every group of every row."""
        return np.asarray(probs, dtype=np.float64).max(axis=2).reshape(-1)

    def mix_distributions(self, spec: "SpecFields", mix: np.ndarray, rows: int) -> dict[str, np.ndarray]:
        """Per group, the share of rows per predicted label."""
        return {g: divide(mix[i], rows) for i, g in enumerate(spec.groups or [])}

    def mix_summary(self, spec: "SpecFields", mix: np.ndarray, rows: int) -> dict[str, Any]:
        """``{group: {label: share of rows}}``."""
        return {g: {label: round(float(v), 6) for label, v in zip(spec.labels, divide(mix[i], rows))}
                for i, g in enumerate(spec.groups or [])}

    def empty_statistics(self, spec: "SpecFields") -> Stats:
        g, k = spec.num_groups, spec.num_labels
        return {"confusion": zeros(g, k, k), "unlabelled": zeros(g), "invalid": zeros(g)}

    def statistics(self, spec: "SpecFields", labels: np.ndarray, probs: np.ndarray) -> Stats:
        stats = self.empty_statistics(spec)
        y = np.asarray(labels).astype(np.int64).reshape(len(labels), spec.num_groups)
        pred = self.predict(spec, np.asarray(probs))
        for g in range(spec.num_groups):
            ok = y[:, g] >= 0
            stats["confusion"][g] += confusion(y[ok, g], pred[ok, g], spec.num_labels)
            stats["unlabelled"][g] += int((y[:, g] == IGNORE_INDEX).sum())
            stats["invalid"][g] += int(((y[:, g] < 0) & (y[:, g] != IGNORE_INDEX)).sum())
        return stats

    def report(self, spec: "SpecFields", stats: Stats) -> dict[str, Any]:
        labels, groups = list(spec.labels), list(spec.groups or [])
        per_group = {g: confusion_report(stats["confusion"][i], labels) for i, g in enumerate(groups)}
        rep: dict[str, Any] = {
            "groups": per_group,
            "overall": confusion_report(stats["confusion"].sum(axis=0), labels),
            "mean_group_macro_f1": float(np.mean([r["macro"]["f1"] for r in per_group.values()])),
        }
        rep["macro"] = rep["overall"]["macro"]
        rep.update(
            rows_labelled={g: int(stats["confusion"][i].sum()) for i, g in enumerate(groups)},
            rows_unlabelled={g: int(stats["unlabelled"][i]) for i, g in enumerate(groups)},
            rows_invalid={g: int(stats["invalid"][i]) for i, g in enumerate(groups)},
        )
        return rep

    def markdown(self, name: str, rep: dict[str, Any]) -> list[str]:
        from mtcls.report_text import class_table, confusion_table, num, pct

        out = [f"- Overall accuracy: {pct(rep['overall']['accuracy'])}", f"- Overall macro F1: {pct(rep['overall']['macro']['f1'])}",
               f"- Mean per-group macro F1: {pct(rep['mean_group_macro_f1'])}", "",
               "| Group | F1 Score (weighted) | Macro F1 | Accuracy | Rows |", "|---|---|---|---|---|"]
        for g, grep in rep["groups"].items():
            out.append(f"| {g} | {num(grep['weighted']['f1'])} | {num(grep['macro']['f1'])} | {num(grep['accuracy'])} | "
                       f"{rep['rows_labelled'][g]} |")
        return out + ["", "Overall classification report:", "", *class_table(rep["overall"]), "", "Overall confusion matrix:",
                      "", *confusion_table(rep["labels"], rep["overall"]["confusion_matrix"])]

    def plot_matrix(self, rep: dict[str, Any]) -> tuple[np.ndarray, list[str], list[str], str, str]:
        return np.array(rep["overall"]["confusion_matrix"]), rep["labels"], rep["labels"], "true", " (all groups)"
