"""``EvalConfig``: the evaluation job's keys, validated before any work starts."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from mtcls.thresholds import DEFAULT_BINS
from pipelines.config import ConfigError, InferencePrecision, JobConfig, check_inference_precision


class EvalConfig(JobConfig):
    """Config of ``jobs.evaluate``."""

    data: str = Field("", description=(
        "Labelled Parquet (any fsspec URI) to score with `model` and evaluate. Empty, without "
        "`predictions`: the embedded demo corpus's test split."))
    model: str = Field("", description="Saved model directory; empty: the embedded default model.")
    predictions: str = Field("", description=(
        "A scoring job's output directory, evaluated instead of scoring `data`."))
    labels: str = Field("", description="Parquet with `id_column` and label columns, joined to `predictions`.")
    allow_incomplete: bool = Field(False, description=(
        "With `predictions`: evaluate a scoring output that is not complete (no `_SUCCESS`, no "
        "`_manifest.json`, or a manifest whose status is incomplete) instead of failing; the warning "
        "is logged and the report's `predictions_incomplete` lists what is missing."))
    output: str = Field("outputs/eval", description=(
        "Report directory (report.json, report.md, one confusion-matrix PNG per head, one "
        "reliability-diagram PNG per calibratable head)."))
    label_columns: dict[str, str] = Field(default_factory=dict, description=(
        "`{head: column}` (or `label_columns.<head>=<column>`); empty: every head that has a column "
        "of its own name."))
    text_columns: list[str] = Field(default_factory=lambda: ["text"], description="Text columns of `data`.")
    id_column: str = Field("id", description="Join key of `predictions` and `labels`.")
    slice_by: list[str] = Field(default_factory=list, description=(
        "Columns whose every value gets its own report (e.g. a source or date column)."))
    max_length: int = Field(0, ge=0, description="Token limit; 0 uses the model's.")
    max_tokens_per_batch: int = Field(0, ge=0, description=(
        "Token budget per forward pass (rows x longest row); 0 picks the device's default (2048 on "
        "CPU, 65536 on GPU)."))
    block_rows: int = Field(4096, ge=1, description="Rows per actor call.")
    num_actors: int = Field(0, ge=0, description=(
        "Inference actors; 0 plans from the cluster (one per GPU, else CPUs minus one)."))
    precision: InferencePrecision = Field("auto", description=(
        "`auto` (bf16/fp16 autocast on GPU; on CPU bf16 where the CPU has native bf16, else fp32), "
        "`fp32`, `bf16`, `fp16`, or `int8` (CPU actors; needs the `int8` extra)."))
    tune_thresholds: bool = Field(True, description=(
        "Report the F1-maximising threshold per label of binary/multilabel heads."))
    threshold_bins: int = Field(DEFAULT_BINS, ge=1, description="Resolution of threshold tuning (bins over [0, 1]).")
    save_tuned_model: str = Field("", description="If set, write a copy of the model with the tuned thresholds here.")
    plots: bool = Field(True, description="Write the confusion-matrix and reliability-diagram PNGs.")
    progress: bool = Field(True, description=(
        "Ray Data's progress bars, shown only with `verbose=true` (`false` hides them then too)."))
    verbose: bool = Field(False, description=(
        "Show Ray's progress bars and INFO logs on the console; Ray's log files keep everything either "
        "way (see [Console output](#console-output))."))

    @field_validator("output")
    @classmethod
    def _output_given(cls, value: str) -> str:
        if not value:
            raise ValueError("a report directory is required")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "EvalConfig":
        if self.predictions and self.data:
            raise ConfigError("keys 'data' and 'predictions': give one source of predictions, not both")
        if self.predictions and not self.labels:
            raise ConfigError("key 'labels': required with 'predictions' (Parquet with the id and label columns)")
        if self.labels and not self.predictions:
            raise ConfigError("key 'labels': only used with 'predictions'; to score labelled data use 'data'")
        check_inference_precision(self)
        if self.save_tuned_model and not self.tune_thresholds:
            raise ConfigError("key 'save_tuned_model': needs tune_thresholds=true")
        return self
