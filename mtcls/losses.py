"""Per-head losses with label masking; the formulas live in each head kind (:mod:`mtcls.kinds`).

Label tensors use ``IGNORE_INDEX`` (-100) for "no label": a row (or a group, or a multilabel entry)
without a label contributes nothing to its head's loss. A batch with no labels at all for a head
gives a zero loss that is still connected to the head's parameters, so DDP sees a gradient for every
parameter on every step.

Label layouts, B = batch size:
    binary        float (B,)     0/1
    multiclass    long  (B,)     label index
    multilabel    float (B, L)   0/1 per label, -100 per missing entry
    grouped       long  (B, G)   label index per group, -100 per missing group
    distribution  float (B, K)   target probabilities; a row with any negative entry is missing
"""

from __future__ import annotations

from typing import Optional

import torch

from mtcls.heads import HeadSpec
from mtcls.kinds import IGNORE_INDEX, mean_of_parts

__all__ = ["IGNORE_INDEX", "head_loss"]


def head_loss(
    spec: HeadSpec,
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: Optional[torch.Tensor] = None,
    pos_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Computes one head's loss over its labelled rows.

    Args:
        spec: The head.
        logits: Head logits; (B, 1) binary, (B, G, K) grouped, (B, K) otherwise.
        labels: Labels in the layout documented in this module.
        class_weights: Optional (K,) weights for multiclass/grouped cross-entropy.
        pos_weight: Optional (1,) or (L,) positive weights for binary/multilabel BCE.

    Returns:
        A scalar tensor: the mean loss over labelled rows (grouped: the mean over groups of
        per-group cross-entropies), or a zero connected to ``logits`` when nothing is labelled.
    """
    weights = class_weights if spec.impl.weight_field == "class_weights" else pos_weight
    return mean_of_parts(*spec.impl.loss_parts(spec, logits, labels, weights))
