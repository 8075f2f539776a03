"""``ScoreConfig``: the scoring job's keys, validated before any work starts."""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Literal, Optional, get_args

from pydantic import Field, field_validator, model_validator

from mtcls.profile import DEFAULT_DRIFT_MIN_ROWS, DEFAULT_DRIFT_THRESHOLD
from pipelines.config import ConfigError, InferencePrecision, JobConfig, check_inference_precision

EmbeddingDtype = Literal["float32", "float16"]
"""Allowed ``embedding_dtype`` values."""

#: Allowed ``embedding_dtype`` values, as a tuple.
EMBEDDING_DTYPES: tuple[str, ...] = get_args(EmbeddingDtype)

OutputFormat = Literal["parquet", "delta"]
"""Allowed ``output_format`` values."""
InputFormat = Literal["auto", "parquet", "delta", "iceberg"]
"""Allowed ``input_format`` values."""


class ScoreConfig(JobConfig):
    """Config of ``jobs.score``. Every key can be set in YAML or as ``key=value``."""

    input: str = Field("", description=(
        "Parquet file or directory, or a Delta Lake table, any fsspec URI (local, `s3://`, `gs://` ...). Empty: "
        "the embedded demo corpus."))
    input_format: InputFormat = Field("auto", description=(
        "`auto`: a directory holding `_delta_log/` is read as a Delta table, anything else as Parquet. "
        "`parquet` or `delta` to say so (a Delta table is never read as a plain directory, which also "
        "holds the files the table removed). See [Delta Lake input](#delta-lake-input)."))
    input_version: Optional[int] = Field(None, ge=0, description=(
        "A Delta table input's version to read (recorded in the manifest); unset: the latest."))
    input_table: str = Field("", description=(
        "An Iceberg table to score, `namespace.name`, through the catalog the `catalog.*` keys describe "
        "(then `input` stays empty). See [Iceberg input](#iceberg-input)."))
    input_snapshot: Optional[int] = Field(None, description=(
        "The Iceberg input's snapshot id to read (recorded in the manifest); unset: the current snapshot."))
    catalog: dict[str, str] = Field(default_factory=dict, description=(
        "pyiceberg catalog properties for `input_table`, as `catalog.<key>=<value>` (`catalog.type=rest`, "
        "`catalog.uri=...`, `catalog.warehouse=...`; `catalog.name`: the catalog's name, default `default`). "
        "Empty: pyiceberg's own configuration (`~/.pyiceberg.yaml`, `PYICEBERG_CATALOG__*`)."))
    output: str = Field("outputs/score", description="Output directory URI.")
    model: str = Field("", description=(
        "Saved model directory (local or URI), with its tokenizer. Empty: the embedded default model."))
    text_columns: list[str] = Field(default_factory=lambda: ["text"], description=(
        "Columns joined with the tokenizer's separator into the text to classify; a row needs at least "
        "one non-empty."))
    id_column: str = Field("id", description=(
        "Row identifier, copied first into the output; rows are matched by id, never by order."))
    passthrough_columns: list[str] = Field(default_factory=list, description=(
        "More input columns to copy into the output."))
    embeddings: bool = Field(False, description=(
        "Also write the `embedding` column: the pooled encoder output the heads see, one fixed-size "
        "vector (the encoder's hidden size) per row, null for rows with an `error` (see "
        "[Output table](#output-table)). The encoder's identity (weights hash, pooling, max length) "
        "goes into the metadata."))
    embedding_dtype: EmbeddingDtype = Field("float32", description=(
        "Element type of the `embedding` column: `float32`, or `float16` (half the bytes)."))
    from_embeddings: bool = Field(False, description=(
        "Heads-only scoring: `input` is an output written with `embeddings=true` and only the heads "
        "run, on its vectors: no tokenizer, no encoder, CPU actors even on a GPU cluster. The encoder "
        "identity recorded in the input's metadata must match the model's encoder. `text_columns` and "
        "`max_tokens_per_batch` are not used; `precision` must be `auto` or `fp32` (the heads run at "
        "fp32); `truncated` is copied from the input (null if it has none); rows with a null vector "
        "get an `error` (`no embedding: ...`). With `embeddings=true` the vectors are copied into the "
        "output. See [Heads-only rescoring](#heads-only-rescoring)."))
    heads: list[str] = Field(default_factory=list, description=(
        "Score only these heads of the model; only their columns are written (heads they read "
        "through `inputs_from` still run). Empty: every head."))
    max_length: int = Field(0, ge=0, description=(
        "Token limit per row; longer rows are truncated and flagged. 0: the model's `max_seq_length`."))
    max_tokens_per_batch: int = Field(0, ge=0, description=(
        "Token budget per forward pass: rows x longest row, after length-sorting each block. 0 picks "
        "the device's default (2048 on CPU, 65536 on GPU)."))
    block_rows: int = Field(4096, ge=1, description=(
        "Rows per actor call (the unit of length sorting; larger blocks pad less)."))
    num_actors: int = Field(0, ge=0, description=(
        "Inference actors; 0 plans from the cluster: one per GPU, on CPU all CPUs but one (read and "
        "write tasks keep one, so the job never hangs)."))
    num_gpus_per_actor: float = Field(-1, description="GPUs per actor; -1: 1 when the cluster has GPUs, else 0.")
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs Ray reserves per actor.")
    torch_threads: int = Field(0, ge=0, description=(
        "CPU inference threads per actor; 0: the node's CPUs divided between the actors (GPU actors: "
        "`num_cpus_per_actor`)."))
    precision: InferencePrecision = Field("auto", description=(
        "`auto`: on GPU bf16 (or fp16) autocast; on CPU bf16 where the CPU has native bf16, else "
        "fp32. Or `fp32`, `bf16`, `fp16`, or `int8` (CPU actors; needs the `int8` extra; see "
        "[Precision](#precision))."))
    rows_per_file: int = Field(100_000, ge=1, description=(
        "Rows per work unit: at most this many consecutive rows of one input file (a larger row group "
        "is read by row range) become one output file (a few when a kill interrupted it)."))
    lock_timeout_s: float = Field(120.0, ge=1, description=(
        "Seconds: a job holding the output that has not renewed its lease for this long is considered "
        "dead and its lock is taken over (the lease is renewed every `min(15, lock_timeout_s / 4)` "
        "seconds). A holder on the same host whose process is gone is taken over at once."))
    output_format: OutputFormat = Field("parquet", description=(
        "`parquet`: a directory of Parquet files with `_manifest.json` and `_SUCCESS`. `delta`: a Delta "
        "Lake table at `output`, each row committed once through the table's log (needs the `delta` "
        "extra; see [Delta Lake output](#delta-lake-output))."))
    lock: bool = Field(True, description=(
        "Hold a lease on the output while the job runs (one writer at a time; see `lock_timeout_s`). "
        "`false` needs `output_format=delta`: no lease, and jobs writing one table at the same time "
        "still commit each input row once."))
    commit_every_files: int = Field(20, ge=1, description=(
        "`output_format=delta`: the driver commits the files written since its last commit, as one "
        "table version, every this many files or every `commit_every_s` seconds, whichever comes "
        "first, and at the end."))
    commit_every_s: float = Field(30.0, gt=0, allow_inf_nan=False, description=(
        "`output_format=delta`: the longest a written file waits for its commit, in seconds (see "
        "`commit_every_files`)."))
    overwrite: bool = Field(False, description=(
        "Delete the existing output first (otherwise a rerun resumes). Never touches the input: an "
        "output on, above or inside the input is refused."))
    prune_missing: bool = Field(False, description=(
        "Remove the committed rows of input files that the input no longer lists. Without it such a "
        "rerun is refused before any work, naming those files."))
    progress: bool = Field(True, description=(
        "Ray Data's progress bars, shown only with `verbose=true` (`false` hides them then too). The "
        "job's own progress line is always shown."))
    verbose: bool = Field(False, description=(
        "Show Ray's progress bars and INFO logs on the console (Ray Data's execution plans, Ray's "
        "start-up lines). Off: only the job's start summary, progress line and summary, and warnings; "
        "Ray's log files keep everything either way (see [Console output](#console-output))."))
    plan: bool = Field(False, description=(
        "Dry run: list the inputs, rows, units, rows already committed and pending, the resource plan "
        "and an estimated time from a short forward pass in the driver; then exit 0 without writing "
        "anything (no lease is taken; see [Dry run](#dry-run-plantrue))."))
    profile: bool = Field(True, description=(
        "Record each head's prediction profile (prediction mix, score histogram) per output file, "
        "merged into the manifest's `profile`, and compare it with the model's reference profile "
        "(`drift`; see \"Drift\")."))
    drift_threshold: float = Field(DEFAULT_DRIFT_THRESHOLD, description=(
        "A head whose prediction-mix PSI against the model's reference profile exceeds this is "
        "flagged in the manifest's `drift` and logged (0.2: the usual \"significant shift\" level)."))
    drift_min_rows: int = Field(DEFAULT_DRIFT_MIN_ROWS, ge=1, description=(
        "A head is judged for drift only when the output and the model's reference profile both have "
        "at least this many rows; below, its PSI is reported with a note and never flagged (a PSI "
        "over a few dozen rows is mostly sampling noise)."))
    fail_on_drift: bool = Field(False, description=(
        "After writing everything and `_SUCCESS`, exit with status 3 when a head is flagged, so a "
        "scheduler can alert."))

    @field_validator("catalog", mode="before")
    @classmethod
    def _dotted_catalog_keys(cls, value: Any) -> Any:
        """``catalog.s3.endpoint=...`` arrives nested (``{"s3": {"endpoint": ...}}``); pyiceberg's
        property is the dotted name ``s3.endpoint``. Values are strings as pyiceberg's properties
        are (``true`` parsed as a boolean goes back to ``true``)."""
        if not isinstance(value, dict):
            return value

        def flat(d: dict, prefix: str = "") -> dict:
            out: dict = {}
            for k, v in d.items():
                if isinstance(v, dict):
                    out.update(flat(v, f"{prefix}{k}."))
                else:
                    out[f"{prefix}{k}"] = str(v).lower() if isinstance(v, bool) else str(v) if isinstance(v, (int, float)) else v
            return out

        return flat(value)

    @field_validator("output")
    @classmethod
    def _output_given(cls, value: str) -> str:
        if not value:
            raise ValueError("an output directory is required")
        return value

    @field_validator("id_column")
    @classmethod
    def _id_given(cls, value: str) -> str:
        if not value:
            raise ValueError("an id column is required (rows are matched by id, never by order)")
        return value

    @field_validator("heads")
    @classmethod
    def _distinct_heads(cls, value: list[str]) -> list[str]:
        if not all(value) or len(set(value)) != len(value):
            raise ValueError(f"expected head names, each once, got {value!r}")
        return value

    @field_validator("drift_threshold")
    @classmethod
    def _positive_threshold(cls, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"must be a positive number, got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ScoreConfig":
        if not self.text_columns and not self.from_embeddings:
            raise ConfigError("key 'text_columns': at least one text column is required")
        if self.from_embeddings and self.precision not in ("auto", "fp32"):
            raise ConfigError(f"key 'precision': from_embeddings runs only the heads, at fp32 on CPU actors; "
                              f"use auto or fp32, got {self.precision!r}")
        if self.from_embeddings and self.num_gpus_per_actor > 0:
            raise ConfigError("key 'num_gpus_per_actor': from_embeddings runs only the heads, on CPU actors; use 0 or -1")
        check_inference_precision(self)
        if self.input_table or self.input_format == "iceberg":
            _check_iceberg_input(self)
        elif self.input_snapshot is not None or self.catalog:
            raise ConfigError(f"key '{'input_snapshot' if self.input_snapshot is not None else 'catalog'}': only for an "
                              f"Iceberg input (input_table)")
        if self.input_format == "delta" and importlib.util.find_spec("deltalake") is None:
            raise ConfigError("key 'input_format': a Delta table input needs the deltalake package: pip install 'mtcls[delta]'")
        if self.input_version is not None and self.input_format == "parquet":
            raise ConfigError("key 'input_version': pins a Delta table's version; input_format=parquet has none")
        if self.output_format == "delta":
            if importlib.util.find_spec("deltalake") is None:
                raise ConfigError("key 'output_format': delta needs the deltalake package: pip install 'mtcls[delta]'")
            if self.embeddings and self.embedding_dtype == "float16":
                raise ConfigError("key 'embedding_dtype': a Delta Lake table has no float16 type; use float32 with "
                                  "output_format=delta")
        elif not self.lock:
            raise ConfigError("key 'lock': lock=false needs output_format=delta (a Parquet directory relies on the "
                              "lease for one writer at a time)")
        if self.fail_on_drift and not self.profile:
            raise ConfigError("key 'fail_on_drift': needs profile=true (drift is measured on the prediction profile)")
        # from_embeddings reads no text: text_columns are not used, and may be passed through.
        dup = [c for c in self.passthrough_columns if c == self.id_column or (c in self.text_columns and not self.from_embeddings)]
        if dup:
            raise ConfigError(f"key 'passthrough_columns': {dup} already in id_column or text_columns")
        return self


def _check_iceberg_input(cfg: ScoreConfig) -> None:
    """An Iceberg input's keys: ``input_table`` instead of ``input``, no Delta version, pyiceberg installed."""
    if not cfg.input_table:
        raise ConfigError("key 'input_table': input_format=iceberg reads the table input_table names (namespace.name)")
    if cfg.input:
        raise ConfigError("key 'input_table': give either input (a path) or input_table (an Iceberg table), not both")
    if cfg.input_format not in ("auto", "iceberg"):
        raise ConfigError(f"key 'input_format': input_table is an Iceberg table, not {cfg.input_format}")
    if cfg.input_version is not None:
        raise ConfigError("key 'input_version': pins a Delta table's version; an Iceberg input is pinned with input_snapshot")
    if "." not in cfg.input_table.strip("."):
        raise ConfigError(f"key 'input_table': expected namespace.name, got {cfg.input_table!r}")
    if importlib.util.find_spec("pyiceberg") is None:
        raise ConfigError("key 'input_table': an Iceberg input needs pyiceberg: pip install 'mtcls[iceberg]'")
