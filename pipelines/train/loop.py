"""The Ray Train loop, as a recipe: set up, then per epoch train, validate and save a checkpoint.

:func:`train_loop_per_worker` runs on every worker and reads top to bottom through
:class:`TrainingRecipe`:

- ``setup``: the model (from the last checkpoint, or the starting model), DDP, AdamW with a
  linear warm-up and decay, the loss scaler, and the data shards;
- ``train_epoch``: optimizer steps of ``gradient_accumulation`` micro-batches whose gradient is
  exactly that of the whole step's loss (:mod:`pipelines.train.step`);
- ``validate``: exact metrics over the workers, calibration, threshold tuning and the heads as
  exported (:mod:`pipelines.train.validation`);
- ``save_checkpoint``: ``ray.train.report`` of the epoch, with a checkpoint from rank 0.

A restarted worker group resumes from the last checkpoint (model, optimizer, schedule, loss scale,
history) and goes on exactly as an uninterrupted run would: data order and random state are
seeded per epoch (:mod:`pipelines.train.batches`). A frozen encoder stays in eval mode. With
cached features (:mod:`pipelines.train.features`) the shards hold ``features`` instead of
``input_ids``, and the worker trains :class:`~pipelines.train.step.FeatureHeads` on them; the
model it checkpoints is still the whole model. Every value the loop reads is a field of its
:class:`~pipelines.train.loop_config.LoopConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from mtcls import MultiTaskModel
from mtcls.precision import training_autocast
from pipelines.progress import TrainingProgress
from pipelines.train.batches import epoch_seed, in_groups, length_grouped
from pipelines.train.loop_config import LoopConfig
from pipelines.train.step import FeatureHeads, accumulate_gradients, micro_batch, micro_batch_rows
from pipelines.train.validation import Validation, validate

log = logging.getLogger(__name__)

#: The loop's state in a checkpoint, next to the model: :class:`RunState` and the optimizer's.
STATE_FILE = "trainer_state.pt"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker.

    Args:
        config: Ray Train's ``train_loop_config``, holding the :class:`LoopConfig` built by
            :func:`pipelines.train.run.run_train`.
    """
    recipe = TrainingRecipe(LoopConfig.from_train_loop_config(config))
    recipe.setup()
    recipe.train()


@dataclass
class RunState:
    """What a resumed worker group needs besides the model and the optimizer: where the run is.

    Attributes:
        epoch: The last finished epoch (-1 before the first).
        history: Per finished epoch, its metrics and ``reports``.
        best: The best ``best_metric`` so far (None before the first epoch).
        bad_epochs: Epochs since it last improved.
        resumes: Restarts from a checkpoint so far.
    """

    epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    best: Optional[float] = None
    bad_epochs: int = 0
    resumes: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunState":
        """The state saved in :data:`STATE_FILE` (which also holds the optimizer's)."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


class TrainingRecipe:
    """One worker's training run: :meth:`setup`, then :meth:`train` (epochs of :meth:`train_epoch`,
    :meth:`validate` and :meth:`save_checkpoint`).

    Args:
        cfg: The loop config (the same on every worker).
    """

    def __init__(self, cfg: LoopConfig) -> None:
        import ray.train
        from ray.train.torch import get_device

        from pipelines.runtime import setup_logging

        setup_logging()
        ctx = ray.train.get_context()
        self.cfg = cfg
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.specs = list(cfg.heads)
        torch.set_num_threads(max(1, cfg.torch_threads))
        self.device = get_device()

    def setup(self) -> None:
        """The model, its DDP wrapper, the optimizer, the schedule, the loss scaler and the data shards."""
        import ray.train
        from ray.train.torch import prepare_model

        cfg = self.cfg
        checkpoint = ray.train.get_checkpoint()
        saved: dict[str, Any] = {}
        if checkpoint:
            with checkpoint.as_directory() as d:
                self.model = MultiTaskModel.from_pretrained(d)
                saved = torch.load(Path(d) / STATE_FILE, weights_only=True)
            self.state = RunState.from_dict(saved)
            self.state.resumes += 1
            log.info("resuming after epoch %d", self.state.epoch)
        else:
            self.model = self._starting_model()
            self.state = RunState()
        if cfg.freeze_encoder:
            self.model.freeze_encoder()
        freeze_unused_pooler(self.model)
        self.model.to(self.device)
        # Cached features: the shards hold pooled features; only the heads run.
        trained = FeatureHeads(self.model) if cfg.cached_features else self.model
        self.ddp_model = prepare_model(trained, parallel_strategy="ddp" if self.world > 1 else None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.learning_rate)
        total = cfg.steps_per_epoch(self.world) * cfg.epochs
        warmup = int(total * cfg.warmup_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: linear_schedule(s, warmup, total))
        self.amp_dtype, use_scaler = training_autocast(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        if checkpoint:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.scaler.load_state_dict(saved["scaler"])

        self.train_shard = ray.train.get_dataset_shard("train")
        self.validation_shard = ray.train.get_dataset_shard("validation")

    def train(self) -> None:
        """The epochs left: train, validate, record, save; stops early without improvement."""
        cfg = self.cfg
        for epoch in range(self.state.epoch + 1, cfg.epochs):
            torch.manual_seed(epoch_seed(cfg.seed, epoch, self.rank))
            start = time.perf_counter()
            train_metrics = self.train_epoch(epoch)
            train_seconds = time.perf_counter() - start
            result = self.validate()
            metrics = {"epoch": epoch, **train_metrics, **result.metrics}
            if self.rank == 0:
                log.info("epoch %d/%d done in %.1f s + %.1f s validation: train loss %.4f; validation %s", epoch + 1, cfg.epochs,
                         train_seconds, time.perf_counter() - start - train_seconds, metrics["train_loss"],
                         ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
            self._record(epoch, metrics, result)
            self.save_checkpoint(metrics)
            if cfg.early_stopping_patience and self.state.bad_epochs >= cfg.early_stopping_patience:
                log.info("early stopping after epoch %d: no improvement of %s for %d epochs", epoch, cfg.best_metric,
                         cfg.early_stopping_patience)
                break

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Trains one epoch on the worker's shard.

        Returns:
            ``train_loss``, ``<head>_train_loss`` (means over micro-batches) and
            ``train_examples_per_s`` (over all workers).
        """
        cfg = self.cfg
        sums = {s.name: 0.0 for s in self.specs}
        total_loss, batches, rows, start = 0.0, 0, 0, time.perf_counter()
        progress = Progress(epoch, cfg.epochs, cfg.batches_per_epoch(self.world))
        window = cfg.batch_size * max(1, cfg.length_grouping)
        windows = self.train_shard.iter_batches(batch_size=window, batch_format="numpy",
                                                local_shuffle_buffer_size=max(2048, window), local_shuffle_seed=cfg.seed + epoch)
        self.model.train()
        if cfg.freeze_encoder:
            # A frozen encoder is a fixed feature extractor: no dropout inside it (and then its
            # features can be cached: pipelines.train.features).
            self.model.encoder.eval()
        for group in in_groups(length_grouped(windows, cfg.batch_size, cfg.seed + epoch), cfg.gradient_accumulation):
            micro_batches = [micro_batch(b, self.specs, cfg.pad_token_id, self.device) for b in group]
            outputs = accumulate_gradients(self.model, self.ddp_model, micro_batches, self.world, self.scaler.scale, self.amp_dtype)
            self._optimizer_step()
            for out, batch in zip(outputs, micro_batches):
                total_loss += out.loss.item()
                for name, value in out.head_losses.items():
                    sums[name] += value.item()
                batches += 1
                rows += micro_batch_rows(batch)
            if self.rank == 0:
                progress.update(batches, rows, total_loss / batches)
        if self.rank == 0:
            progress.close()  # the epoch's last line: batches, examples/s and its time
        seconds = time.perf_counter() - start
        return {"train_loss": total_loss / max(batches, 1), "train_examples_per_s": rows * self.world / max(seconds, 1e-9),
                **{f"{n}_train_loss": v / max(batches, 1) for n, v in sums.items()}}

    def validate(self) -> Validation:
        """The whole validation set's metrics and reports (the same on every worker)."""
        cfg = self.cfg
        return validate(self.model, self.validation_shard, self.specs, cfg.validation_batch_size, cfg.pad_token_id,
                        self.device, self.rank, self.world, cfg.tuning_bins, cfg.calibrate)

    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        """``ray.train.report`` of an epoch on every worker; rank 0 also saves the checkpoint.

        The checkpoint is the model (``save_pretrained``), :data:`STATE_FILE` (the run state and
        the optimizer's, schedule's and loss scaler's) and ``metrics.json``.
        """
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0:
                self.model.save_pretrained(d)
                state = {**dataclasses.asdict(self.state), "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
                torch.save(state, Path(d) / STATE_FILE)
                (Path(d) / "metrics.json").write_text(json.dumps(metrics, indent=2))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    def _starting_model(self) -> MultiTaskModel:
        import ray

        from pipelines.artifacts import LocalCopy

        init = LocalCopy(ray.get(self.cfg.init_files[0]))
        model = MultiTaskModel.from_pretrained(init.path)
        init.remove()
        return model

    def _record(self, epoch: int, metrics: dict[str, Any], result: Validation) -> None:
        """Adds the epoch to the run state: history, best score, epochs without improvement."""
        state = self.state
        score = metrics[self.cfg.best_metric]
        improved = state.best is None or score > state.best
        state.epoch = epoch
        state.best = max(score, state.best or score)
        state.bad_epochs = 0 if improved else state.bad_epochs + 1
        state.history = state.history + [{**metrics, **{k: v for k, v in result.record().items() if k not in metrics}}]

    def _optimizer_step(self) -> None:
        if self.cfg.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def linear_schedule(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor of ``step``: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


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


class Progress(TrainingProgress):
    """Rank 0's progress line (epoch, batch, mean loss, examples/s, ETA) every ``every`` seconds,
    and the training metrics: :class:`pipelines.progress.TrainingProgress` on this module's logger."""

    def __init__(self, epoch: int, epochs: int, steps: int, every: float = 30.0) -> None:
        super().__init__(epoch, epochs, steps, every=every, logger=log)
