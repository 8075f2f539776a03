"""``EvalConfig``: the evaluation job's keys, validated before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtcls.thresholds import DEFAULT_BINS
from pipelines.config import ConfigError, check_inference_precision, require_at_least


@dataclass
class EvalConfig:
    """Config of ``jobs.evaluate``.

    Attributes:
        data: Labelled Parquet (any fsspec URI) to score with ``model`` and evaluate.
        model: Saved model directory; empty: the embedded default model.
        predictions: A scoring job's output directory, evaluated instead of scoring ``data``.
        labels: Parquet with ``id_column`` and label columns, joined to ``predictions``.
        output: Report directory (report.json, report.md, one confusion-matrix PNG per head, one
            reliability-diagram PNG per calibratable head).
        label_columns: ``{head: column}``; empty: every head that has a column of its own name.
        text_columns: Text columns of ``data``.
        id_column: Join key of ``predictions`` and ``labels``.
        slice_by: Columns whose every value gets its own report (e.g. a source or date column).
        max_length: Token limit; 0 uses the model's.
        max_tokens_per_batch: Token budget per forward pass (rows x longest row); 0 picks the
            device's default (2048 on CPU, 65536 on GPU).
        block_rows: Rows per actor call.
        num_actors: Inference actors; 0 plans from the cluster (one per GPU, else CPUs minus one).
        precision: ``auto`` (bf16/fp16 autocast on GPU; on CPU bf16 where the CPU has native bf16,
            else fp32), ``fp32``, ``bf16``, ``fp16``, or ``int8`` (CPU actors; needs the ``int8`` extra).
        tune_thresholds: Report the F1-maximising threshold per label of binary/multilabel heads.
        threshold_bins: Resolution of threshold tuning (bins over [0, 1]).
        save_tuned_model: If set, write a copy of the model with the tuned thresholds here.
        plots: Write the confusion-matrix and reliability-diagram PNGs.
        progress: Ray Data progress bars.
    """

    data: str = ""
    model: str = ""
    predictions: str = ""
    labels: str = ""
    output: str = "outputs/eval"
    label_columns: dict[str, str] = field(default_factory=dict)
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    id_column: str = "id"
    slice_by: list[str] = field(default_factory=list)
    max_length: int = 0
    max_tokens_per_batch: int = 0
    block_rows: int = 4096
    num_actors: int = 0
    precision: str = "auto"
    tune_thresholds: bool = True
    threshold_bins: int = DEFAULT_BINS
    save_tuned_model: str = ""
    plots: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.predictions and self.data:
            raise ConfigError("keys 'data' and 'predictions': give one source of predictions, not both")
        if self.predictions and not self.labels:
            raise ConfigError("key 'labels': required with 'predictions' (Parquet with the id and label columns)")
        if self.labels and not self.predictions:
            raise ConfigError("key 'labels': only used with 'predictions'; to score labelled data use 'data'")
        if not self.output:
            raise ConfigError("key 'output': a report directory is required")
        require_at_least(self, 1, "block_rows", "threshold_bins")
        require_at_least(self, 0, "max_length", "max_tokens_per_batch", "num_actors")
        check_inference_precision(self)
        if self.save_tuned_model and not self.tune_thresholds:
            raise ConfigError("key 'save_tuned_model': needs tune_thresholds=true")


