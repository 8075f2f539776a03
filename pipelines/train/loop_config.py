"""``LoopConfig``: every value the training loop reads, typed, built once on the driver.

Ray Train hands the loop a dict (``train_loop_config``); the driver puts one :class:`LoopConfig`
in it (:meth:`LoopConfig.as_train_loop_config`) and the loop takes it out
(:meth:`LoopConfig.from_train_loop_config`), so the loop never reads keys or defaults of its own.
The defaults here are those of the training job's ``TrainConfig``; the job builds the config with
:meth:`LoopConfig.from_train_config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from mtcls import HeadSpec
from mtcls.thresholds import DEFAULT_BINS

if TYPE_CHECKING:
    from pipelines.train.config import TrainConfig

#: The key of the :class:`LoopConfig` in Ray Train's ``train_loop_config``.
LOOP_CONFIG_KEY = "loop"


@dataclass(frozen=True)
class LoopConfig:
    """What one Ray Train worker needs to train, validate and checkpoint.

    Attributes:
        heads: The model's heads, in model order (as the starting model has them).
        init_files: ``[ray.put(read_model_files(dir))]`` of the starting model (read when no
            checkpoint is there to resume from).
        train_rows: Training rows over all workers (sets the steps per epoch and the schedule).
        cached_features: The shards hold pooled ``features`` instead of ``input_ids``
            (:mod:`pipelines.train.features`): only the heads run.
        pad_token_id: The tokenizer's padding id.
        torch_threads: CPU threads of each worker.
        seed: Seed of the data order and of each epoch's random state.
        freeze_encoder: Train the heads only; the encoder stays in eval mode.
        learning_rate: AdamW's peak learning rate.
        weight_decay: AdamW's weight decay of weight matrices (none on biases and norm weights).
        epochs: Epochs to train (fewer with early stopping).
        batch_size: Rows per micro-batch on each worker (validation reads twice as many at once).
        gradient_accumulation: Micro-batches per optimizer step.
        warmup_ratio: Share of the steps with a linear warm-up (then a linear decay).
        precision: Training's ``precision`` key (:func:`mtcls.precision.training_autocast`).
        max_grad_norm: Gradient clipping (0 = off).
        early_stopping_patience: Stop after this many epochs without improvement (0 = off).
        best_metric: The validation metric that picks the best epoch.
        tune_thresholds: Tune the thresholds of heads whose kind tunes them in training.
        threshold_bins: Resolution of threshold tuning (bins over [0, 1]).
        calibrate: Fit each calibratable head's calibration on the validation set every epoch.
        length_grouping: Rows are sorted by length within windows of this many batches (1 = off).
    """

    heads: tuple[HeadSpec, ...]
    init_files: Sequence[Any]
    train_rows: int
    cached_features: bool = False
    pad_token_id: int = 0
    torch_threads: int = 1
    seed: int = 0
    freeze_encoder: bool = False
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    epochs: int = 3
    batch_size: int = 32
    gradient_accumulation: int = 1
    warmup_ratio: float = 0.1
    precision: str = "auto"
    max_grad_norm: float = 1.0
    early_stopping_patience: int = 0
    best_metric: str = "mean_macro_f1"
    tune_thresholds: bool = True
    threshold_bins: int = DEFAULT_BINS
    calibrate: bool = True
    length_grouping: int = 50

    @classmethod
    def from_train_config(cls, cfg: "TrainConfig", heads: Sequence[HeadSpec], init_files: Sequence[Any], train_rows: int,
                          pad_token_id: int, torch_threads: int) -> "LoopConfig":
        """The loop config of a training job: its keys, and what the driver prepared.

        Args:
            cfg: The job's config (its fields are read by name).
            heads: The prepared heads (labels and weights resolved).
            init_files: The starting model's files in the object store.
            train_rows: Prepared training rows.
            pad_token_id: The tokenizer's padding id.
            torch_threads: CPU threads of each worker.
        """
        shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.name in _JOB_KEYS}
        return cls(heads=tuple(heads), init_files=init_files, train_rows=train_rows, cached_features=bool(cfg.cached),
                   pad_token_id=pad_token_id, torch_threads=torch_threads, **shared)

    def as_train_loop_config(self) -> dict[str, Any]:
        """Ray Train's ``train_loop_config``: a dict holding this config."""
        return {LOOP_CONFIG_KEY: self}

    @staticmethod
    def from_train_loop_config(config: dict[str, Any]) -> "LoopConfig":
        """The config the driver put in Ray Train's ``train_loop_config``."""
        return config[LOOP_CONFIG_KEY]

    @property
    def tuning_bins(self) -> int:
        """Bins of threshold tuning, 0 when thresholds are not tuned."""
        return self.threshold_bins if self.tune_thresholds else 0

    @property
    def validation_batch_size(self) -> int:
        """Rows read from the validation shard at once (no gradients: twice a training batch)."""
        return self.batch_size * 2

    def batches_per_epoch(self, world: int) -> int:
        """Micro-batches of one worker's epoch (about: shards differ by a few rows)."""
        return math.ceil(self.train_rows / world / self.batch_size)

    def steps_per_epoch(self, world: int) -> int:
        """Optimizer steps of one worker's epoch."""
        return math.ceil(self.train_rows / world / self.batch_size / self.gradient_accumulation)


#: The fields that are the training job's keys of the same name.
_JOB_KEYS = ("seed", "freeze_encoder", "learning_rate", "weight_decay", "epochs", "batch_size",
             "gradient_accumulation", "warmup_ratio", "precision", "max_grad_norm", "early_stopping_patience",
             "best_metric", "tune_thresholds", "threshold_bins", "calibrate", "length_grouping")
