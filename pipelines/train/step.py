"""One optimizer step's forward and backward passes, with the loss of the whole step.

A kind's loss comes as ``(sums, denominators)`` per part, and both add up. An optimizer step takes
``gradient_accumulation`` micro-batches on every worker; its gradient is exactly that of the loss
of all of them taken as one batch: each head's denominators are summed over the step's
micro-batches and all-reduced over the workers first (:func:`step_denominators`), then every
micro-batch back-propagates its ``sums / step denominators`` (:func:`step_loss`). A micro-batch
with one label of a head then weighs one label's worth, not a whole batch's.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mtcls import HeadSpec, MultiTaskModel
from mtcls.inference import Tokens
from mtcls.kinds import mean_of_parts
from mtcls.modeling import MultiTaskOutput
from pipelines.train.features import FEATURES


def accumulate_gradients(model: MultiTaskModel, ddp_model: nn.Module, micro_batches: Sequence[dict[str, Any]],
                         world: int = 1, scale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                         amp_dtype: Optional[torch.dtype] = None) -> list[MultiTaskOutput]:
    """Forward and backward passes of one optimizer step's micro-batches on this worker.

    Afterwards the gradients (averaged by DDP over workers) are those of the loss of every
    micro-batch of every worker taken as one batch, whatever the spread of each head's labels.

    Args:
        model: The model.
        ddp_model: ``model`` or its DDP wrapper (gradients are only synchronised on the last
            micro-batch); for cached features, :class:`FeatureHeads` of the model or its DDP wrapper.
        micro_batches: Dicts with ``input_ids``, ``attention_mask`` and ``labels`` (``{head: tensor}``,
            every head), on the model's device; for cached features ``features`` (B, H) instead
            of ``input_ids`` and ``attention_mask`` (see :func:`micro_batch`).
        world: Number of workers; every worker calls this with the same number of micro-batches.
        scale: Applied to each loss before its backward pass (``GradScaler.scale``).
        amp_dtype: Autocast dtype, or None for full precision.

    Returns:
        The micro-batches' outputs (their ``loss`` and ``head_losses`` are the micro-batch means).
    """
    denominators = step_denominators(model, micro_batches, world)
    outputs = []
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = ddp_model.no_sync() if not last and isinstance(ddp_model, DistributedDataParallel) else contextlib.nullcontext()
        with sync:
            inputs = {"pooled": batch[FEATURES]} if FEATURES in batch else \
                {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            device = next(iter(inputs.values())).device
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = ddp_model(**inputs, labels=batch["labels"])
            loss = step_loss(model, out.loss_parts, denominators, world)
            (scale(loss) if scale else loss).backward()
        outputs.append(out)
    return outputs


def step_denominators(model: MultiTaskModel, micro_batches: Sequence[dict[str, Any]], world: int) -> dict[str, torch.Tensor]:
    """Per head, the loss denominators of a whole optimizer step: summed over micro-batches and workers.

    They depend on the labels (and class weights) only, so the kind's ``loss_parts`` gives them
    from zero logits before any forward pass.

    Args:
        model: The (unwrapped) model.
        micro_batches: The step's micro-batches on this worker (see :func:`accumulate_gradients`).
        world: Number of workers; above 1 the denominators are all-reduced (every worker calls this).

    Returns:
        ``{head: (P,) denominators}``.
    """
    totals: dict[str, torch.Tensor] = {}
    for batch in micro_batches:
        for name, labels in batch["labels"].items():
            spec = model.specs[name]
            zeros = torch.zeros(len(labels), *spec.impl.logit_shape(spec), device=labels.device)
            denominators = model.head_loss_parts(name, zeros, labels)[1].detach()
            totals[name] = totals[name] + denominators if name in totals else denominators
    if world > 1:
        import torch.distributed as dist

        names = sorted(totals)
        flat = torch.cat([totals[n] for n in names])  # one all-reduce for every head
        dist.all_reduce(flat)
        totals = dict(zip(names, flat.split([len(totals[n]) for n in names])))
    return totals


def step_loss(model: MultiTaskModel, loss_parts: dict[str, tuple[torch.Tensor, torch.Tensor]],
              denominators: dict[str, torch.Tensor], world: int) -> torch.Tensor:
    """One micro-batch's share of the step loss, scaled so that DDP's gradient average gives the step's gradient.

    Per head, the mean over the step's non-empty parts of ``sums / step denominators``, weighted by
    the head's ``loss_weight``; the shares of every micro-batch on every worker add up to the loss
    of the whole step. A head without labels in the step gives a zero still connected to its
    parameters (DDP needs a gradient for every parameter).

    Args:
        model: The (unwrapped) model, for the heads' loss weights.
        loss_parts: ``MultiTaskOutput.loss_parts`` of the micro-batch.
        denominators: From :func:`step_denominators`.
        world: Number of workers (DDP averages gradients, so the loss is multiplied by it).

    Returns:
        A scalar tensor.
    """
    total = torch.zeros((), device=next(iter(denominators.values())).device)
    for name, (sums, _) in loss_parts.items():
        total = total + model.specs[name].loss_weight * mean_of_parts(sums, denominators[name])
    return total * world


def micro_batch(batch: dict[str, np.ndarray], specs: Sequence[HeadSpec], pad_id: int, device: torch.device) -> dict[str, Any]:
    """A training batch from the data shard as :func:`accumulate_gradients` takes it.

    Args:
        batch: Numpy columns: ``input_ids`` (or cached ``features``) and ``y_<head>`` per head.
        specs: The heads.
        pad_id: Padding token id.
        device: The model's device.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}`` tensors, or ``{"features", "labels"}``.
    """
    labels = {s.name: s.impl.collate(s, np.stack(batch[f"y_{s.name}"])).to(device) for s in specs}
    if FEATURES in batch:
        return {FEATURES: torch.from_numpy(np.ascontiguousarray(batch[FEATURES], dtype=np.float32)).to(device), "labels": labels}
    rows = batch["input_ids"]
    ids, mask = Tokens.from_rows(rows).padded(np.arange(len(rows)), pad_id)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels}


def micro_batch_rows(batch: dict[str, Any]) -> int:
    """Rows of a batch made by :func:`micro_batch`."""
    return len(next(iter(batch["labels"].values())))


class FeatureHeads(nn.Module):
    """The model seen from cached features: ``(pooled, labels) -> MultiTaskOutput`` by ``forward_heads``.

    A module of its own so that DDP wraps (and synchronises) this call; the encoder inside is
    frozen, so DDP has no gradient of it to reduce.
    """

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pooled: torch.Tensor, labels: Optional[dict[str, torch.Tensor]] = None) -> MultiTaskOutput:
        return self.model.forward_heads(pooled, labels)
