"""``binary``: two labels (negative first), one logit, sigmoid, BCE with ``pos_weight``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from mtcls.kinds.base import SpecFields, IGNORE_INDEX, HeadKind, float_rows, per_label_reliability, register_kind
from mtcls.spec_checks import check_positive_list, check_probability


@register_kind
class Binary(HeadKind):
    """Positive when p(positive) >= ``thresholds`` (default 0.5). Labels: (N,) 0/1, -100 = none."""

    name = "binary"
    exact_labels = 2
    weight_field = "pos_weight"
    tunable = True
    own_fields = ("thresholds",)

    def validate(self, spec: "SpecFields", fail: Callable[[str, str], None]) -> None:
        super().validate(spec, fail)
        if spec.thresholds is not None:
            spec.thresholds = check_probability(spec.name, "thresholds", spec.thresholds)

    def check_weights(self, spec: "SpecFields", value: Any) -> Any:
        return check_positive_list(spec.name, "pos_weight", [value], 1)[0]

    def num_logits(self, spec: "SpecFields") -> int:
        return 1

    def thresholds(self, spec: "SpecFields") -> list[float]:
        return [0.5 if spec.thresholds is None else float(spec.thresholds)]

    def threshold_labels(self, spec: "SpecFields") -> list[str]:
        return list(spec.labels[1:])

    def with_thresholds(self, spec: "SpecFields", thresholds: list[float]) -> "SpecFields":
        return dataclasses.replace(spec, thresholds=float(thresholds[0]))

    def resolve_weights(self, spec: "SpecFields", counts: list[int], total: int, sqrt: bool) -> Any:
        neg, pos = counts
        weight = float(neg) / pos if pos > 0 and neg > 0 else 1.0
        return weight ** 0.5 if sqrt else weight

    def probabilities(self, spec: "SpecFields", logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def loss_parts(self, spec: "SpecFields", logits: torch.Tensor, labels: torch.Tensor,
                   weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        y = labels.float().reshape(-1)
        mask = y != IGNORE_INDEX
        total = F.binary_cross_entropy_with_logits(logits.float().reshape(-1)[mask], y[mask], pos_weight=weights,
                                                   reduction="sum")
        return total.reshape(1), mask.sum().to(total.dtype).reshape(1)

    def collate(self, spec: "SpecFields", rows: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(rows.astype(np.float32)).reshape(-1)

    def label_counts(self, spec: "SpecFields", encoded: np.ndarray) -> tuple[list[int], int]:
        y = encoded[encoded >= 0]
        return [int((y == 0).sum()), int((y == 1).sum())], int(len(y))

    def predict(self, spec: "SpecFields", probs: np.ndarray) -> np.ndarray:
        return (np.asarray(probs).reshape(-1) >= self.thresholds(spec)[0]).astype(np.int64)

    def full_probabilities(self, spec: "SpecFields", probs: np.ndarray) -> np.ndarray:
        p = np.asarray(probs).reshape(-1, 1)
        return np.concatenate([1.0 - p, p], axis=1)

    def probabilities_from_columns(self, spec: "SpecFields", table: Any) -> np.ndarray:
        return float_rows(table.column(f"{spec.name}_probs"), 2)[:, 1:]

    def reliability(self, spec: "SpecFields", probs: np.ndarray, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        return per_label_reliability(probs, labels)
