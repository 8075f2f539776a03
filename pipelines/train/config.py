"""``TrainConfig``: the training job's keys, validated before any work starts."""

# No ``from __future__ import annotations``: ``TrainHead``'s ``Required`` keys must be seen when the class is made.
from typing import Annotated, Any, Literal, NoReturn, Optional, get_args

from pydantic import AfterValidator, ConfigDict, Field, ValidationError, field_validator, model_validator, with_config
from pydantic_core import InitErrorDetails, PydanticCustomError
from typing_extensions import Required, TypedDict

from mtcls import HeadSpec, HeadSpecError, get_kind, kind_names
from mtcls.thresholds import DEFAULT_BINS
from pipelines.config import ConfigError, JobConfig, TrainPrecision


def _known_kind(kind: str) -> str:
    if kind not in kind_names():
        raise ValueError(f"unknown head kind {kind!r}; expected one of {kind_names()}")
    return kind


@with_config(ConfigDict(extra="forbid", strict=True))
class TrainHead(TypedDict, total=False):
    """One entry of ``heads``: the fields of a :class:`mtcls.HeadSpec` plus ``column``.

    ``name`` and ``kind`` are required; ``labels`` may be left out for kinds whose labels can be
    inferred from the training data; ``column`` is the label column (default: the head's name).
    The entry stays a plain dict holding the keys given. Types are checked here; with ``labels``
    the entry is also checked as a whole by :class:`mtcls.HeadSpec`.
    """

    name: Required[str]
    kind: Required[Annotated[str, AfterValidator(_known_kind)]]
    column: str
    labels: list[str]
    groups: Optional[list[str]]
    hidden_sizes: list[int]
    activation: str
    dropout: float
    loss_weight: float
    class_weights: Any  # a list of numbers or "balanced" / "sqrt_balanced": HeadSpec checks it
    pos_weight: Any
    thresholds: Any
    cumulative_threshold: Optional[float]
    inputs_from: list[str]
    temperature: Optional[float]
    logit_offset: Optional[list[float]]


def _fail_in_head(head: dict[str, Any], field: Optional[str], message: str) -> NoReturn:
    """Raises a validation error at ``field`` of the head entry (so the key reads ``heads[i].field``)."""
    error = PydanticCustomError("head_spec", "{message}", {"message": message})
    loc = (field,) if field else ()
    raise ValidationError.from_exception_data(
        "TrainHead", [InitErrorDetails(type=error, loc=loc, input=head.get(field) if field else head)])


def _check_head(head: TrainHead) -> TrainHead:
    """The checks of a head entry as a whole: :class:`mtcls.HeadSpec`'s with ``labels``, else that they can be inferred."""
    name = head["name"]
    if "labels" in head:
        try:
            HeadSpec.from_dict({k: v for k, v in head.items() if k != "column"})
        except HeadSpecError as exc:
            if exc.head is not None:  # one field of this head: the key reads heads[i].<field>
                _fail_in_head(head, exc.field, f"head {name!r}: {exc.detail}")
            _fail_in_head(head, exc.field, str(exc))
    elif not get_kind(head["kind"]).labels_inferable:
        _fail_in_head(head, "labels", f"head {name!r}: a {head['kind']} head needs 'labels' (they cannot be inferred)")
    return head


class TrainConfig(JobConfig):
    """Config of ``jobs.train``."""

    train: list[str] = Field(default_factory=list, description=(
        "Training Parquet files or directories (any fsspec URI); several may be labelled for "
        "different heads. Empty: the embedded demo corpus (with its heads if `heads` is empty)."))
    validation: list[str] = Field(default_factory=list, description=(
        "Validation Parquet; empty: `validation_fraction` of the training rows."))
    validation_fraction: float = Field(0.1, gt=0, lt=1, description=(
        "Share of training rows held out when `validation` is empty."))
    output: str = Field("outputs/model", description=(
        "Model directory URI (`save_pretrained` + tokenizer + training_summary.json + "
        "reference_profile.json + plots)."))
    encoder: str = Field("", description=(
        "Encoder directory (any Hugging Face encoder); empty: the packaged all-MiniLM-L6-v2."))
    init_model: str = Field("", description=(
        "Start from a saved mtcls model instead (its heads are kept; new heads are added)."))
    heads: list[Annotated[TrainHead, AfterValidator(_check_head)]] = Field(default_factory=list, description=(
        "Head specs (the fields of `mtcls.HeadSpec`) plus `column`: the label column (default: the "
        "head's name). `labels` may be omitted to infer them from the training data (not for "
        "distribution heads)."))
    text_columns: list[str] = Field(default_factory=lambda: ["text"], description=(
        "Text columns, joined with the tokenizer's separator."))
    pooling: Literal["mean", "cls"] = Field("mean", description=(
        "How the encoder's token outputs become the heads' input: `mean` (over the non-padding "
        "tokens) or `cls` (the first token)."))
    max_length: int = Field(128, ge=1, description="Token limit; longer rows are truncated.")
    epochs: int = Field(3, ge=1, description="Training epochs.")
    batch_size: int = Field(32, ge=1, description="Rows per micro-batch, on each worker.")
    learning_rate: float = Field(5e-5, gt=0, description=(
        "Peak AdamW learning rate: linear warm-up, then linear decay."))
    weight_decay: float = Field(0.01, description=(
        "AdamW weight decay, on weight matrices (not on biases and LayerNorm weights)."))
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of the optimizer steps spent warming up.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, description="Gradient clipping (0 = off).")
    precision: TrainPrecision = Field("auto", description=(
        "`auto` (GPU: bf16, or fp16 with loss scaling; CPU: bf16 where the CPU has native bf16, "
        "else fp32), `fp32`, `bf16` (autocast on CPU too) or `fp16`."))
    freeze_encoder: bool = Field(False, description=(
        "Train the heads only. The encoder stays in eval mode (no dropout inside it): it is a fixed "
        "feature extractor."))
    cache_features: Optional[bool] = Field(None, description=(
        "With `freeze_encoder`, compute every row's pooled encoder features once (a Ray Data stage "
        "before training, kept in the object store: rows x hidden size x 4 bytes) and train the "
        "heads on them; epochs then skip the encoder. Unset (null, the default): on when "
        "`freeze_encoder` is. `false` runs the encoder every epoch (same result); `true` without "
        "`freeze_encoder` is an error."))
    early_stopping_patience: int = Field(0, description="Stop after this many epochs without improvement (0 = off).")
    best_metric: str = Field("mean_macro_f1", description=(
        "`mean_macro_f1`, `<head>_macro_f1`, or for a multilabel head with `tune_thresholds`, "
        "`<head>_tuned_macro_f1`; the best epoch by it is exported."))
    tune_thresholds: bool = Field(True, description=(
        "For multilabel heads, pick per-label thresholds maximising F1 on the validation set after "
        "every epoch, and export the best epoch with them. Metrics at the tuned thresholds are "
        "optimistic on the validation set itself; check them on a test set."))
    threshold_bins: int = Field(DEFAULT_BINS, ge=2, description="Resolution of threshold tuning (bins over [0, 1]).")
    calibrate: bool = Field(True, description=(
        "After every epoch's validation, fit a calibration per head (not distribution heads): the "
        "`log(pos_weight)` offset of weighted sigmoid heads and a temperature minimising the "
        "validation NLL, kept only if it lowers the NLL of held-out validation folds "
        "(`mtcls.calibration.fit_calibration`); thresholds are mapped onto the calibrated scores. "
        "The exported model config carries the best epoch's calibration, and training_summary.json "
        "lists it with the validation ECE before and after."))
    length_grouping: int = Field(50, ge=1, description=(
        "Batches pad to their longest row; rows are sorted by length within windows of this many "
        "batches, then the batches are shuffled (1 = off)."))
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    max_failures: int = Field(2, description="Worker failures survived by resuming from the last checkpoint.")
    storage_path: str = Field("", description=(
        "Where Ray Train keeps checkpoints (a shared URI on a cluster); empty: `outputs/ray_train`."))
    max_train_rows: int = Field(0, description="Cap on training rows (0 = all), for quick runs.")
    seed: int = Field(0, description="Random seed.")
    verbose: bool = Field(False, description=(
        "Show Ray's progress bars and INFO logs on the console (Ray Train's worker-group lines, Ray "
        "Data's execution plans); Ray's log files keep everything either way (see "
        "[Console output](#console-output))."))

    @field_validator("precision", mode="before")
    @classmethod
    def _not_int8(cls, value: Any) -> Any:
        if value == "int8":
            raise ValueError(f"expected one of {list(get_args(TrainPrecision))} (int8 is an inference precision), "
                             f"got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if not self.heads and self.train:
            raise ConfigError("key 'heads': at least one head is required")
        if self.cache_features and not self.freeze_encoder:
            raise ConfigError("key 'cache_features': features can be cached only for a frozen encoder "
                              "(set freeze_encoder=true, or leave cache_features unset)")
        names = [h["name"] for h in self.heads]
        allowed = ["mean_macro_f1", *[f"{n}_macro_f1" for n in names]]
        if self.tune_thresholds:
            allowed += [f"{h['name']}_tuned_macro_f1" for h in self.heads if get_kind(h["kind"]).tuned_in_training]
        if self.best_metric not in allowed:
            raise ConfigError(f"key 'best_metric': expected one of {allowed}, got {self.best_metric!r}")
        return self

    @property
    def cached(self) -> bool:
        """Whether the heads train on cached features (``cache_features``, default ``freeze_encoder``)."""
        return self.freeze_encoder if self.cache_features is None else self.cache_features

    def head_column(self, head: dict[str, Any]) -> str:
        """The label column of a ``heads`` entry: its ``column``, else the head's name."""
        return head.get("column") or head["name"]
