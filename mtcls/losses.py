"""Per-kind losses with label masking.

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
import torch.nn.functional as F

from mtcls.heads import HeadSpec

IGNORE_INDEX = -100


def _zero(logits: torch.Tensor) -> torch.Tensor:
    return logits.sum() * 0.0


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
    logits = logits.float()
    kind = spec.kind
    if kind == "binary":
        y = labels.float().reshape(-1)
        mask = y != IGNORE_INDEX
        if not mask.any():
            return _zero(logits)
        return F.binary_cross_entropy_with_logits(logits.reshape(-1)[mask], y[mask], pos_weight=pos_weight)
    if kind == "multiclass":
        y = labels.long().reshape(-1)
        if not (y != IGNORE_INDEX).any():
            return _zero(logits)
        return F.cross_entropy(logits, y, weight=class_weights, ignore_index=IGNORE_INDEX)
    if kind == "multilabel":
        y = labels.float()
        mask = y != IGNORE_INDEX
        if not mask.any():
            return _zero(logits)
        per_entry = F.binary_cross_entropy_with_logits(
            logits, y.clamp(min=0.0), pos_weight=pos_weight, reduction="none"
        )  # (B, L)
        return (per_entry * mask).sum() / mask.sum()
    if kind == "grouped":
        y = labels.long()  # (B, G)
        losses = []
        for g in range(logits.shape[1]):
            yg = y[:, g]
            if (yg != IGNORE_INDEX).any():
                losses.append(F.cross_entropy(logits[:, g, :], yg, weight=class_weights, ignore_index=IGNORE_INDEX))
        if not losses:
            return _zero(logits)
        return torch.stack(losses).mean()
    if kind == "distribution":
        y = labels.float()
        mask = (y >= 0).all(dim=-1)
        if not mask.any():
            return _zero(logits)
        log_p = F.log_softmax(logits[mask], dim=-1)
        # KL(target || model), summed over classes, averaged over rows ("batchmean").
        return F.kl_div(log_p, y[mask], reduction="batchmean")
    raise ValueError(f"head {spec.name!r}: unknown kind {kind!r}")

