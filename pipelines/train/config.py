"""``TrainConfig``: the training job's keys, validated before any work starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from mtcls import PRECISIONS, HeadSpec, HeadSpecError, get_kind, kind_names
from mtcls.thresholds import DEFAULT_BINS
from pipelines.config import ConfigError, require_at_least

_SPEC_FIELDS = {f.name for f in dataclasses.fields(HeadSpec)}


@dataclass
class TrainConfig:
    """Config of ``jobs.train``.

    Attributes:
        train: Training Parquet files or directories (any fsspec URI); several may be labelled for
            different heads. Empty: the embedded demo corpus.
        validation: Validation Parquet; empty: ``validation_fraction`` of the training rows.
        validation_fraction: Share of training rows held out when ``validation`` is empty.
        output: Model directory URI (``save_pretrained`` + tokenizer + training_summary.json + plots).
        encoder: Encoder directory (any Hugging Face encoder); empty: the packaged all-MiniLM-L6-v2.
        init_model: Start from a saved mtcls model instead (its heads are kept; new heads are added).
        heads: Head specs (see ``mtcls.HeadSpec``) plus ``column``: the label column (default: the
            head's name). ``labels`` may be omitted to infer them from the training data.
        text_columns: Text columns, joined with the tokenizer's separator.
        pooling: ``mean`` or ``cls``.
        max_length: Token limit.
        epochs, batch_size, learning_rate, weight_decay, warmup_ratio: Optimisation (AdamW, linear
            warm-up then linear decay; no weight decay on biases and LayerNorm weights).
        gradient_accumulation: Micro-batches per optimizer step.
        max_grad_norm: Gradient clipping (0 = off).
        precision: ``auto`` (GPU: bf16, or fp16 with loss scaling; CPU: bf16 where the CPU has
            native bf16, else fp32), ``fp32``, ``bf16`` (autocast on CPU too) or ``fp16``.
        freeze_encoder: Train the heads only (card 004). The encoder stays in eval mode (no
            dropout inside it): it is a fixed feature extractor.
        cache_features: With ``freeze_encoder``, compute every row's pooled encoder features once
            (a Ray Data stage before training, kept in the object store: rows x hidden size x 4
            bytes) and train the heads on them; epochs then skip the encoder. Unset (null, the
            default): on when ``freeze_encoder`` is. ``false`` runs the encoder every epoch
            (same result); ``true`` without ``freeze_encoder`` is an error.
        early_stopping_patience: Stop after this many epochs without improvement (0 = off).
        best_metric: ``mean_macro_f1`` (card 002), ``<head>_macro_f1``, or for a multilabel head
            with ``tune_thresholds``, ``<head>_tuned_macro_f1``; the best epoch is exported.
        tune_thresholds: For multilabel heads, pick per-label thresholds maximising F1 on the
            validation set after every epoch, and export the best epoch with them. Metrics at the
            tuned thresholds are optimistic on the validation set itself; check them on a test set.
        threshold_bins: Resolution of threshold tuning (bins over [0, 1]).
        calibrate: After every epoch's validation, fit a calibration per head (not distribution
            heads): the ``log(pos_weight)`` offset of weighted sigmoid heads and a temperature
            minimising the validation NLL, kept only if it lowers the NLL of held-out validation
            folds (:func:`mtcls.calibration.fit_calibration`); thresholds are mapped onto the
            calibrated scores. The exported model config carries the best epoch's calibration, and
            training_summary.json lists it with the validation ECE before and after.
        length_grouping: Batches pad to their longest row; rows are sorted by length within
            windows of this many batches, then the batches are shuffled (1 = off).
        num_workers: Ray Train workers (DDP).
        use_gpu: One GPU per worker.
        max_failures: Worker failures survived by resuming from the last checkpoint.
        storage_path: Where Ray Train keeps checkpoints (a shared URI on a cluster).
        max_train_rows: Cap on training rows (0 = all), for quick runs.
        seed: Random seed.
    """

    train: list[str] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)
    validation_fraction: float = 0.1
    output: str = "outputs/model"
    encoder: str = ""
    init_model: str = ""
    heads: list[dict[str, Any]] = field(default_factory=list)
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    pooling: str = "mean"
    max_length: int = 128
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    precision: str = "auto"
    freeze_encoder: bool = False
    cache_features: Optional[bool] = None
    early_stopping_patience: int = 0
    best_metric: str = "mean_macro_f1"
    tune_thresholds: bool = True
    threshold_bins: int = DEFAULT_BINS
    calibrate: bool = True
    length_grouping: int = 50
    num_workers: int = 1
    use_gpu: bool = False
    max_failures: int = 2
    storage_path: str = ""
    max_train_rows: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.heads and self.train:
            raise ConfigError("key 'heads': at least one head is required")
        for i, head in enumerate(self.heads):
            if not isinstance(head, dict):
                raise ConfigError(f"key 'heads[{i}]': expected a mapping, got {head!r}")
            unknown = sorted(set(head) - _SPEC_FIELDS - {"column"})
            if unknown:
                raise ConfigError(f"key 'heads[{i}]' ({head.get('name')!r}): unknown field(s) {unknown}")
            for req in ("name", "kind"):
                if req not in head:
                    raise ConfigError(f"key 'heads[{i}]': missing {req!r}")
            if "labels" in head:
                try:
                    HeadSpec.from_dict({k: v for k, v in head.items() if k != "column"})
                except HeadSpecError as exc:
                    raise ConfigError(f"key 'heads[{i}]': {exc}") from exc
            elif head["kind"] not in kind_names():
                raise ConfigError(f"key 'heads[{i}]' ({head['name']!r}): unknown kind {head['kind']!r}; expected one of {kind_names()}")
            elif not get_kind(head["kind"]).labels_inferable:
                raise ConfigError(f"key 'heads[{i}]' ({head['name']!r}): a {head['kind']} head needs 'labels' (they cannot be inferred)")
        require_at_least(self, 1, "epochs", "batch_size", "gradient_accumulation", "num_workers", "max_length", "length_grouping")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(f"key 'validation_fraction': must be in (0, 1), got {self.validation_fraction}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"key 'warmup_ratio': must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ConfigError(f"key 'learning_rate': must be > 0, got {self.learning_rate}")
        train_precisions = [p for p in PRECISIONS if p != "int8"]
        if self.precision not in train_precisions:
            why = " (int8 is an inference precision)" if self.precision == "int8" else ""
            raise ConfigError(f"key 'precision': expected one of {train_precisions}{why}, got {self.precision!r}")
        if self.pooling not in ("mean", "cls"):
            raise ConfigError(f"key 'pooling': expected 'mean' or 'cls', got {self.pooling!r}")
        if self.cache_features and not self.freeze_encoder:
            raise ConfigError("key 'cache_features': features can be cached only for a frozen encoder "
                              "(set freeze_encoder=true, or leave cache_features unset)")
        if self.threshold_bins < 2:
            raise ConfigError(f"key 'threshold_bins': must be >= 2, got {self.threshold_bins}")
        names = [h["name"] for h in self.heads]
        allowed = ["mean_macro_f1", *[f"{n}_macro_f1" for n in names]]
        if self.tune_thresholds:
            allowed += [f"{h['name']}_tuned_macro_f1" for h in self.heads if get_kind(h["kind"]).tuned_in_training]
        if self.best_metric not in allowed:
            raise ConfigError(f"key 'best_metric': expected one of {allowed}, got {self.best_metric!r}")

    @property
    def cached(self) -> bool:
        """Whether the heads train on cached features (``cache_features``, default ``freeze_encoder``)."""
        return self.freeze_encoder if self.cache_features is None else self.cache_features

    def head_column(self, head: dict[str, Any]) -> str:
        return head.get("column") or head["name"]


