"""``multiclass``: K labels, softmax, cross-entropy with ``class_weights``, arg-max."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from mtcls.kinds.base import SpecFields, IGNORE_INDEX, HeadKind, register_kind
from mtcls.spec_checks import check_positive_list


def weighted_cross_entropy_parts(logits: torch.Tensor, y: torch.Tensor,
                                 weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of (weighted) cross-entropies and the sum of weights of the labelled rows, as (1,) tensors."""
    total = F.cross_entropy(logits.float(), y, weight=weights, ignore_index=IGNORE_INDEX, reduction="sum")
    labelled = y[y != IGNORE_INDEX]
    denom = weights[labelled].sum() if weights is not None else torch.tensor(float(len(labelled)), device=logits.device)
    return total.reshape(1), denom.to(total.dtype).reshape(1)


@register_kind
class Multiclass(HeadKind):
    """One of K labels. Labels: (N,) label index, -100 = none."""

    name = "multiclass"
    weight_field = "class_weights"

    def check_weights(self, spec: "SpecFields", value: Any) -> Any:
        return check_positive_list(spec.name, "class_weights", value, spec.num_labels)

    def loss_parts(self, spec: "SpecFields", logits: torch.Tensor, labels: torch.Tensor,
                   weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return weighted_cross_entropy_parts(logits, labels.long().reshape(-1), weights)
