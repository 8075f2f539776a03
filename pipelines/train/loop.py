"""The Ray Train loop: DDP fine-tuning with masked multi-head losses, per-epoch validation, checkpoints.

Every worker reads its shard of the training data. An optimizer step takes ``gradient_accumulation``
micro-batches on every worker, and its gradient is exactly that of the whole step's loss: each
head's loss is divided by its labelled rows (or weights) over all micro-batches and workers, not
micro-batch by micro-batch (:func:`accumulate_gradients`). Validation rows are split between
workers by row number, each worker computes the library's mergeable statistics on its rows, and an
all-reduce sums them, so the reported metrics are exactly those of the whole validation set. Each
epoch ends with ``ray.train.report`` (a checkpoint from rank 0); a restarted worker group resumes
from the last checkpoint (model, optimizer, schedule, loss scale, history) and goes on exactly as an
uninterrupted run would: data order and random state are seeded per epoch.

A frozen encoder stays in eval mode. With cached features (:mod:`pipelines.train.features`) the
shards hold ``features`` instead of ``input_ids``, and the worker trains :class:`FeatureHeads`
(``forward_heads``) on them; the model it checkpoints is still the whole model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mtcls import HeadSpec, MultiTaskModel, head_report, head_statistics
from mtcls.calibration import calibrate_spec, calibrated_probabilities, calibration_report, uncalibrate_spec
from mtcls.inference import pad_batch
from mtcls.precision import cpu_native_bf16
from mtcls.kinds import mean_of_parts
from mtcls.metrics import empty_statistics, merge_statistics
from mtcls.modeling import MultiTaskOutput, head_probabilities
from mtcls.thresholds import best_thresholds, threshold_histograms
from pipelines.train.features import FEATURES, LENGTH
from pipelines.train.reference import reference_profiles

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


def _schedule(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _autocast(precision: str, device: torch.device) -> tuple[Any, bool]:
    """Training's precision rule: ``(autocast dtype or None, use a loss scaler)``.

    On a GPU, ``auto`` is bf16 where supported, else fp16 with loss scaling. On a CPU, ``auto`` is
    bf16 where the CPU has native bf16 (measured on OLID: same test macro-F1 as fp32, 1.4x faster;
    benchmarks/RESULTS.md), else fp32; ``bf16`` autocasts; fp16 has no fast CPU path and trains fp32.
    """
    if precision == "fp32":
        return None, False
    if device.type != "cuda":
        if precision == "fp16":
            log.warning("precision fp16 has no CPU training path: training in fp32")
        if precision == "bf16" or (precision == "auto" and cpu_native_bf16()):
            return torch.bfloat16, False
        return None, False
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def length_grouped(batches: Any, batch_size: int, seed: int) -> Any:
    """Re-cuts large batches into ``batch_size`` batches of similar length, in shuffled order.

    Each incoming batch (a window of many training batches) is sorted by token count and cut into
    batches; their order is then shuffled. Batches pad to their longest row, so this removes most
    padding (short texts such as GoEmotions' comments) while every row is still seen once per epoch.
    Rows of cached features carry their token count in ``length``, so they are cut into the same
    batches as their token ids would be.
    """
    rng = np.random.default_rng(seed)
    for window in batches:
        lengths = window[LENGTH] if LENGTH in window else [len(x) for x in window["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for k in rng.permutation(len(chunks)):
            yield {key: value[chunks[k]] for key, value in window.items()}


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one worker's epoch (dropout), so a resumed epoch repeats exactly."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def in_groups(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last one may be shorter)."""
    group: list[Any] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters: weight decay on weight matrices only.

    Biases, LayerNorm (and other norm) weights and every other 1-D parameter get no weight decay.

    Args:
        model: The model.
        weight_decay: Weight decay of the weight matrices (and embeddings).

    Returns:
        The non-empty groups, decayed first.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def freeze_unused_pooler(model: MultiTaskModel) -> None:
    """Freezes the encoder's own pooler layer (BERT, RoBERTa, ...), if it has one.

    The heads read the encoder's last hidden states, so the pooler gets no gradient; DDP waits for
    a gradient of every trainable parameter and would never reduce the bucket holding it.
    """
    pooler = getattr(model.encoder, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)


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
        flat = torch.cat([totals[n] for n in names])
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
            of ``input_ids`` and ``attention_mask``.
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


def micro_batch(batch: dict[str, np.ndarray], specs: list[HeadSpec], pad_id: int, device: torch.device) -> dict[str, Any]:
    """A training batch from the data shard as :func:`accumulate_gradients` takes it."""
    labels = {s.name: s.impl.collate(s, np.stack(batch[f"y_{s.name}"])).to(device) for s in specs}
    if FEATURES in batch:
        return {FEATURES: torch.from_numpy(np.ascontiguousarray(batch[FEATURES], dtype=np.float32)).to(device), "labels": labels}
    ids, mask = pad_batch(batch["input_ids"], pad_id)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels}


class FeatureHeads(nn.Module):
    """The model seen from cached features: ``(pooled, labels) -> MultiTaskOutput`` by
    ``forward_heads``. A module of its own so that DDP wraps (and synchronises) this call; the
    encoder inside is frozen, so DDP has no gradient of it to reduce."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pooled: torch.Tensor, labels: Optional[dict[str, torch.Tensor]] = None) -> MultiTaskOutput:
        return self.model.forward_heads(pooled, labels)


class Progress:
    """Logs training progress (step, loss, examples/s, time left in the epoch) every ``every`` seconds."""

    def __init__(self, epoch: int, epochs: int, steps: int, every: float = 30.0) -> None:
        self.epoch, self.epochs, self.steps, self.every = epoch, epochs, steps, every
        self.start = self.last = time.perf_counter()

    def update(self, batches: int, rows: int, loss: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        rate = rows / (now - self.start)
        left = (self.steps - batches) * (now - self.start) / max(batches, 1)
        log.info("epoch %d/%d: batch %d/%d (%.0f%%), mean loss %.4f, %.1f examples/s per worker, ~%.0f s left in the epoch",
                 self.epoch + 1, self.epochs, batches, self.steps, 100 * batches / max(self.steps, 1), loss, rate, max(left, 0))


def _tuned_macro_f1(spec: HeadSpec, hist: dict[str, np.ndarray]) -> dict[str, Any]:
    tuned = best_thresholds(spec, hist)
    return {**tuned, "macro_f1": float(np.mean(tuned["f1"]))}


def validate(model: MultiTaskModel, shard: Any, specs: list[HeadSpec], batch_size: int, pad_id: int,
             device: torch.device, rank: int, world: int, tune_bins: int = 0, calibrate: bool = False) -> dict[str, Any]:
    """Exact validation metrics: per-worker statistics on rows ``row % world == rank``, all-reduced.

    With ``calibrate``, every head whose kind is calibratable first gets a calibration
    (:func:`mtcls.calibration.fit_calibration`: the temperature minimising its validation NLL after
    the kind's prior offset, kept only if it lowers the NLL of held-out folds), in
    ``reports[head]["calibration"]`` with the NLL and ECE before and after. Fitting needs every validation logit, not a sum: each worker
    keeps its rows' logits and labels (small: one row of logits per validation row), all of them
    are all-gathered in rank order, and every worker fits the same temperature on the same data
    (deterministic CPU code), so the workers cannot diverge. The statistics and metrics below are
    those of the calibrated scores, as the exported model outputs them.

    With ``tune_bins``, multilabel heads also get per-label thresholds maximising validation F1
    (from threshold histograms, summed like the statistics), reported as
    ``<head>_tuned_macro_f1`` and in ``reports[head]["tuned_thresholds"]``. They are tuned on the
    raw scores and mapped through the calibration (:func:`mtcls.calibration.calibrate_spec`), which
    is tuning on the calibrated scores over the mapped grid: the same decisions, so calibration
    cannot move a head's macro-F1. ``reports[head]["head"]`` is the head as exported.
    """
    model.eval()
    logits: dict[str, list[torch.Tensor]] = {s.name: [] for s in specs}
    labels: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    with torch.inference_mode():
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            mine = np.flatnonzero(batch["row"] % world == rank)
            if not len(mine):
                continue
            if FEATURES in batch:  # cached features: only the heads run
                out = model.forward_heads(torch.from_numpy(np.ascontiguousarray(batch[FEATURES][mine], dtype=np.float32)).to(device))
            else:
                ids, mask = pad_batch([batch["input_ids"][i] for i in mine], pad_id)
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
            for spec in specs:
                logits[spec.name].append(out.logits[spec.name].float().cpu())
                labels[spec.name].append(np.stack([batch[f"y_{spec.name}"][i] for i in mine]))
    local = {n: (torch.cat(logits[n]), np.concatenate(labels[n])) for n in logits if logits[n]}
    given = {s.name: (s.temperature, s.logit_offset) for s in specs}  # a warm start's calibration, if any
    specs = [uncalibrate_spec(s) for s in specs]
    calibration = _calibrate(specs, local, world) if calibrate else {}
    fitted = {**given, **{n: (c["temperature"], c["logit_offset"]) for n, c in calibration.items()}}
    # The specs whose scores are measured: calibrated, with their thresholds mapped to the calibrated scores.
    scored = {s.name: calibrate_spec(s, *fitted[s.name]) for s in specs}

    stats = {s.name: empty_statistics(s) for s in specs}
    tuned = [s for s in specs if tune_bins and s.impl.tuned_in_training]
    hists = {s.name: {"pos": np.zeros((s.num_labels, tune_bins), np.int64), "neg": np.zeros((s.num_labels, tune_bins), np.int64)} for s in tuned}
    raw = {s.name: s for s in specs}  # thresholds on the raw scores
    for name, (z, y) in local.items():
        stats[name] = merge_statistics(stats[name], head_statistics(scored[name], y, calibrated_probabilities(scored[name], z).numpy()))
        if name in hists:  # tuned on the raw scores, then mapped: calibration never moves a decision
            for key, value in threshold_histograms(raw[name], y, head_probabilities(raw[name], z).numpy(), tune_bins).items():
                hists[name][key] += value
    if world > 1:
        import torch.distributed as dist

        for parts in [*stats.values(), *hists.values()]:
            for key, value in parts.items():
                t = torch.as_tensor(value)
                dist.all_reduce(t)
                parts[key] = t.numpy()
    reports = {s.name: head_report(scored[s.name], stats[s.name]) for s in specs}
    metrics = {f"{n}_macro_f1": r["macro_f1"] for n, r in reports.items()}
    metrics["mean_macro_f1"] = float(np.mean(list(metrics.values())))
    for name, result in calibration.items():
        reports[name]["calibration"] = result
    # The heads as exported: calibration, and thresholds tuned then mapped to the calibrated scores.
    exported = dict(scored)
    for spec in tuned:
        result = _tuned_macro_f1(spec, hists[spec.name])
        exported[spec.name] = calibrate_spec(spec.impl.with_thresholds(spec, result["thresholds"]), *fitted[spec.name])
        result["raw_thresholds"], result["thresholds"] = result["thresholds"], exported[spec.name].label_thresholds()
        reports[spec.name]["tuned_thresholds"] = result
        metrics[f"{spec.name}_tuned_macro_f1"] = result["macro_f1"]
    for name, head in exported.items():
        reports[name]["head"] = head.to_dict()
    for name, prof in reference_profiles(list(exported.values()), local, world).items():
        reports[name]["profile"] = prof
    return {"metrics": metrics, "reports": reports}


def _calibrate(specs: list[HeadSpec], local: dict[str, tuple[torch.Tensor, np.ndarray]], world: int) -> dict[str, Any]:
    """Per calibratable head, :func:`mtcls.calibration.calibration_report` on every worker's validation rows.

    Above one worker, the rows' logits and labels are all-gathered (in rank order, so every worker
    fits on the same data and gets the same temperature).
    """
    parts = [{n: (z.numpy(), y) for n, (z, y) in local.items()}]
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, parts[0])
        parts = gathered
    out = {}
    for spec in specs:
        mine = [p[spec.name] for p in parts if spec.name in p]
        if spec.impl.calibratable and mine:
            z = torch.from_numpy(np.concatenate([m[0] for m in mine]))
            out[spec.name] = calibration_report(spec, z, np.concatenate([m[1] for m in mine]))
    return out


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. ``config`` is built by :func:`pipelines.train.run.run_train`."""
    import ray
    import ray.train
    from ray.train.torch import get_device, prepare_model

    from pipelines.artifacts import LocalCopy
    from pipelines.runtime import setup_logging

    setup_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, config["torch_threads"]))
    device = get_device()
    specs = [HeadSpec.from_dict(s) for s in config["specs"]]

    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] = {"epoch": -1, "history": [], "best": None, "bad_epochs": 0, "resumes": 0}
    if checkpoint:
        with checkpoint.as_directory() as d:
            model = MultiTaskModel.from_pretrained(d)
            state = torch.load(Path(d) / STATE_FILE, weights_only=True)
        state["resumes"] += 1
        log.info("resuming after epoch %d", state["epoch"])
    else:
        init = LocalCopy(ray.get(config["init_files"][0]))
        model = MultiTaskModel.from_pretrained(init.path)
        init.remove()
    if config["freeze_encoder"]:
        model.freeze_encoder()
    freeze_unused_pooler(model)
    model.to(device)
    # Cached features (pipelines.train.features): the shards hold pooled features; only the heads run.
    trained = FeatureHeads(model) if config.get("cached_features") else model
    ddp_model = prepare_model(trained, parallel_strategy="ddp" if world > 1 else None)

    optimizer = torch.optim.AdamW(param_groups(model, config["weight_decay"]), lr=config["learning_rate"])
    steps_per_epoch = math.ceil(config["train_rows"] / world / config["batch_size"] / config["gradient_accumulation"])
    total = steps_per_epoch * config["epochs"]
    warmup = int(total * config["warmup_ratio"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, warmup, total))
    amp_dtype, use_scaler = _autocast(config["precision"], device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    if checkpoint:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    trainer = _Trainer(model, ddp_model, optimizer, scheduler, scaler, amp_dtype, config, specs, device, rank, world)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    for epoch in range(state["epoch"] + 1, config["epochs"]):
        torch.manual_seed(epoch_seed(config["seed"], epoch, rank))
        start = time.perf_counter()
        train_metrics = trainer.train_epoch(train_shard, epoch)
        train_seconds = time.perf_counter() - start
        result = validate(model, val_shard, specs, config["batch_size"] * 2, config["pad_token_id"], device, rank, world,
                          config["threshold_bins"], config.get("calibrate", False))
        metrics = {"epoch": epoch, **train_metrics, **result["metrics"]}
        if rank == 0:
            log.info("epoch %d/%d done in %.1f s + %.1f s validation: train loss %.4f; validation %s", epoch + 1, config["epochs"],
                     train_seconds, time.perf_counter() - start - train_seconds, metrics["train_loss"],
                     ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
        score = metrics[config["best_metric"]]
        improved = state["best"] is None or score > state["best"]
        state.update(epoch=epoch, best=max(score, state["best"] or score), bad_epochs=0 if improved else state["bad_epochs"] + 1)
        state["history"] = state["history"] + [{**metrics, "reports": result["reports"]}]
        _report(metrics, state, trainer if rank == 0 else None)
        patience = config["early_stopping_patience"]
        if patience and state["bad_epochs"] >= patience:
            log.info("early stopping after epoch %d: no improvement of %s for %d epochs", epoch, config["best_metric"], patience)
            break


class _Trainer:
    """One worker's model, optimizer, schedule and loss scaler, and its training epochs."""

    def __init__(self, model: MultiTaskModel, ddp_model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 scaler: torch.amp.GradScaler, amp_dtype: Optional[torch.dtype], config: dict[str, Any],
                 specs: list[HeadSpec], device: torch.device, rank: int, world: int) -> None:
        self.model, self.ddp_model, self.optimizer, self.scheduler, self.scaler = model, ddp_model, optimizer, scheduler, scaler
        self.amp_dtype, self.config, self.specs, self.device, self.rank, self.world = amp_dtype, config, specs, device, rank, world
        self.params = [p for p in model.parameters() if p.requires_grad]

    def train_epoch(self, shard: Any, epoch: int) -> dict[str, float]:
        """Trains one epoch on the worker's shard; returns the mean training losses and the throughput."""
        cfg = self.config
        sums = {s.name: 0.0 for s in self.specs}
        total_loss, batches, rows, start = 0.0, 0, 0, time.perf_counter()
        progress = Progress(epoch, cfg["epochs"], math.ceil(cfg["train_rows"] / self.world / cfg["batch_size"]))
        window = cfg["batch_size"] * max(1, cfg["length_grouping"])
        windows = shard.iter_batches(batch_size=window, batch_format="numpy",
                                     local_shuffle_buffer_size=max(2048, window), local_shuffle_seed=cfg["seed"] + epoch)
        self.model.train()
        if cfg["freeze_encoder"]:
            # A frozen encoder is a fixed feature extractor: no dropout inside it (and then its
            # features can be cached: pipelines.train.features).
            self.model.encoder.eval()
        for group in in_groups(length_grouped(windows, cfg["batch_size"], cfg["seed"] + epoch), cfg["gradient_accumulation"]):
            micro_batches = [micro_batch(b, self.specs, cfg["pad_token_id"], self.device) for b in group]
            outputs = accumulate_gradients(self.model, self.ddp_model, micro_batches, self.world, self.scaler.scale, self.amp_dtype)
            self._step()
            for out, batch in zip(outputs, micro_batches):
                total_loss += out.loss.item()
                for name, value in out.head_losses.items():
                    sums[name] += value.item()
                batches += 1
                rows += len(next(iter(batch["labels"].values())))
            if self.rank == 0:
                progress.update(batches, rows, total_loss / batches)
        seconds = time.perf_counter() - start
        return {"train_loss": total_loss / max(batches, 1), "train_examples_per_s": rows * self.world / max(seconds, 1e-9),
                **{f"{n}_train_loss": v / max(batches, 1) for n, v in sums.items()}}

    def _step(self) -> None:
        if self.config["max_grad_norm"] > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.config["max_grad_norm"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed worker needs besides the model and the history."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}


def _report(metrics: dict[str, Any], state: dict[str, Any], trainer: Optional[_Trainer]) -> None:
    """``ray.train.report`` of an epoch; the worker given the trainer (rank 0) also saves the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if trainer is not None:
            trainer.model.save_pretrained(d)
            torch.save({**state, **trainer.state_dict()}, Path(d) / STATE_FILE)
            (Path(d) / "metrics.json").write_text(json.dumps(metrics, indent=2))
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt)
