"""The Ray Train loop: DDP fine-tuning with masked multi-head losses, per-epoch validation, checkpoints.

Every worker reads its shard of the training data; validation rows are split between workers by
row number, each worker computes the library's mergeable statistics on its rows, and an all-reduce
sums them, so the reported metrics are exactly those of the whole validation set. Each epoch ends
with ``ray.train.report`` (a checkpoint from rank 0); a restarted worker group resumes from the last
checkpoint (model, optimizer, schedule, history).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtcls import HeadSpec, MultiTaskModel, head_report, head_statistics
from mtcls.inference import pad_batch
from mtcls.metrics import empty_statistics, merge_statistics
from mtcls.modeling import head_probabilities
from mtcls.thresholds import best_thresholds, threshold_histograms

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


def _labels(spec: HeadSpec, column: Any) -> torch.Tensor:
    y = torch.as_tensor(np.stack(column).astype(np.float32))
    if spec.kind == "multiclass":
        return y.reshape(-1).long()
    if spec.kind == "binary":
        return y.reshape(-1)
    if spec.kind == "grouped":
        return y.reshape(len(y), spec.num_groups).long()
    return y.reshape(len(y), spec.num_labels)


def _schedule(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _autocast(precision: str, device: torch.device) -> tuple[Any, bool]:
    if device.type != "cuda" or precision == "fp32":
        return None, False
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def length_grouped(batches: Any, batch_size: int, seed: int) -> Any:
    """Re-cuts large batches into ``batch_size`` batches of similar length, in shuffled order.

    Each incoming batch (a window of many training batches) is sorted by token count and cut into
    batches; their order is then shuffled. Batches pad to their longest row, so this removes most
    padding (short texts such as GoEmotions' comments) while every row is still seen once per epoch.
    """
    rng = np.random.default_rng(seed)
    for window in batches:
        order = np.argsort([len(x) for x in window["input_ids"]], kind="stable")
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for k in rng.permutation(len(chunks)):
            yield {key: value[chunks[k]] for key, value in window.items()}


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
             device: torch.device, rank: int, world: int, tune_bins: int = 0) -> dict[str, Any]:
    """Exact validation metrics: per-worker statistics on rows ``row % world == rank``, all-reduced.

    With ``tune_bins``, multilabel heads also get per-label thresholds maximising validation F1
    (from threshold histograms, summed like the statistics), reported as ``<head>_tuned_macro_f1``
    and in ``reports[head]["tuned_thresholds"]``.
    """
    model.eval()
    stats = {s.name: empty_statistics(s) for s in specs}
    tuned = [s for s in specs if tune_bins and s.kind == "multilabel"]
    hists = {s.name: {"pos": np.zeros((s.num_labels, tune_bins), np.int64), "neg": np.zeros((s.num_labels, tune_bins), np.int64)} for s in tuned}
    with torch.inference_mode():
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            mine = np.flatnonzero(batch["row"] % world == rank)
            if not len(mine):
                continue
            ids, mask = pad_batch([batch["input_ids"][i] for i in mine], pad_id)
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
            for spec in specs:
                probs = head_probabilities(spec, out.logits[spec.name].float()).cpu().numpy()
                labels = np.stack([batch[f"y_{spec.name}"][i] for i in mine])
                if spec.kind in ("binary", "multiclass"):
                    labels = labels.reshape(-1)
                stats[spec.name] = merge_statistics(stats[spec.name], head_statistics(spec, labels, probs))
                if spec.name in hists:
                    for key, value in threshold_histograms(spec, labels, probs, tune_bins).items():
                        hists[spec.name][key] += value
    if world > 1:
        import torch.distributed as dist

        for parts in [*stats.values(), *hists.values()]:
            for key, value in parts.items():
                t = torch.as_tensor(value)
                dist.all_reduce(t)
                parts[key] = t.numpy()
    reports = {s.name: head_report(s, stats[s.name]) for s in specs}
    metrics = {f"{n}_macro_f1": r["macro_f1"] for n, r in reports.items()}
    metrics["mean_macro_f1"] = float(np.mean(list(metrics.values())))
    for spec in tuned:
        reports[spec.name]["tuned_thresholds"] = _tuned_macro_f1(spec, hists[spec.name])
        metrics[f"{spec.name}_tuned_macro_f1"] = reports[spec.name]["tuned_thresholds"]["macro_f1"]
    return {"metrics": metrics, "reports": reports}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. ``config`` is built by :func:`pipelines.training.run_training`."""
    import ray
    import ray.train
    from ray.train.torch import get_device, prepare_model

    from pipelines.runtime import setup_logging
    from pipelines.scoring import materialize_model_files

    setup_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] + rank)
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
        model = MultiTaskModel.from_pretrained(materialize_model_files(ray.get(config["init_files"][0])))
    if config["freeze_encoder"]:
        model.freeze_encoder()
    model.to(device)
    ddp_model = prepare_model(model, parallel_strategy="ddp" if world > 1 else None)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["learning_rate"], weight_decay=config["weight_decay"])
    steps_per_epoch = math.ceil(config["train_rows"] / world / config["batch_size"] / config["gradient_accumulation"])
    total = steps_per_epoch * config["epochs"]
    warmup = int(total * config["warmup_ratio"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, warmup, total))
    if checkpoint:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    amp_dtype, use_scaler = _autocast(config["precision"], device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    pad_id, accum = config["pad_token_id"], config["gradient_accumulation"]

    for epoch in range(state["epoch"] + 1, config["epochs"]):
        model.train()
        sums = {s.name: 0.0 for s in specs}
        total_loss, batches, rows, epoch_start = 0.0, 0, 0, time.perf_counter()
        progress = Progress(epoch, config["epochs"], math.ceil(config["train_rows"] / world / config["batch_size"]))
        window = config["batch_size"] * max(1, config["length_grouping"])
        windows = train_shard.iter_batches(batch_size=window, batch_format="numpy",
                                           local_shuffle_buffer_size=max(2048, window), local_shuffle_seed=config["seed"] + epoch)
        for batch in length_grouped(windows, config["batch_size"], config["seed"] + epoch):
            ids, mask = pad_batch(batch["input_ids"], pad_id)
            labels = {s.name: _labels(s, batch[f"y_{s.name}"]).to(device) for s in specs}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = ddp_model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels)
            scaler.scale(out.loss / accum).backward()
            total_loss += out.loss.item()
            for name, value in out.head_losses.items():
                sums[name] += value.item()
            batches += 1
            rows += len(ids)
            if rank == 0:
                progress.update(batches, rows, total_loss / batches)
            _maybe_fail(config, epoch)
            if batches % accum == 0:
                _step(scaler, optimizer, scheduler, params, config["max_grad_norm"])
        if batches % accum:
            _step(scaler, optimizer, scheduler, params, config["max_grad_norm"])
        train_seconds = time.perf_counter() - epoch_start

        result = validate(model, val_shard, specs, config["batch_size"] * 2, pad_id, device, rank, world, config["threshold_bins"])
        metrics = {"epoch": epoch, "train_loss": total_loss / max(batches, 1),
                   "train_examples_per_s": rows * world / max(train_seconds, 1e-9),
                   **{f"{n}_train_loss": v / max(batches, 1) for n, v in sums.items()}, **result["metrics"]}
        if rank == 0:
            log.info("epoch %d/%d done in %.0f s: train loss %.4f; validation %s", epoch + 1, config["epochs"], train_seconds,
                     metrics["train_loss"], ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
        score = metrics[config["best_metric"]]
        improved = state["best"] is None or score > state["best"]
        state.update(epoch=epoch, best=max(score, state["best"] or score), bad_epochs=0 if improved else state["bad_epochs"] + 1)
        state["history"] = state["history"] + [{**metrics, "reports": result["reports"]}]
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                model.save_pretrained(d)
                torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, Path(d) / STATE_FILE)
                (Path(d) / "metrics.json").write_text(json.dumps(metrics, indent=2))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
        patience = config["early_stopping_patience"]
        if patience and state["bad_epochs"] >= patience:
            log.info("early stopping after epoch %d: no improvement of %s for %d epochs", epoch, config["best_metric"], patience)
            break


def _step(scaler: Any, optimizer: Any, scheduler: Any, params: list, max_norm: float) -> None:
    if max_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _maybe_fail(config: dict[str, Any], epoch: int) -> None:
    """Fault injection for tests (``MTCLS_FAULT_EPOCH``): kill this worker process once, mid-epoch."""
    marker = config.get("fault_marker")
    if config.get("fault_epoch", -1) == epoch and marker and not os.path.exists(marker):
        Path(marker).write_text("killed")
        # Ray Train's controller collects reports on its health-check poll (every 2 s); a worker
        # that dies sooner after reporting loses that report, so die a little later, as a real
        # failure mid-epoch would.
        time.sleep(5)
        os._exit(1)
