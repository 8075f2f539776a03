"""``ScoreConfig``: the scoring job's keys, validated before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mtcls.profile import DEFAULT_DRIFT_THRESHOLD
from pipelines.config import ConfigError, check_inference_precision, require_at_least

#: Allowed ``embedding_dtype`` values.
EMBEDDING_DTYPES = ("float32", "float16")


@dataclass
class ScoreConfig:
    """Config of ``jobs.score``. Every key can be set in YAML or as ``key=value``.

    Attributes:
        input: Parquet file or directory, any fsspec URI. Empty: the embedded demo corpus.
        output: Output directory URI.
        model: Saved model directory (local or URI). Empty: the embedded default model.
        text_columns: Columns joined (with the tokenizer's separator) into the text to classify.
        id_column: Row identifier, copied first into the output.
        passthrough_columns: Further input columns copied into the output.
        embeddings: Add an ``embedding`` column: the pooled encoder output the heads see, one
            fixed-size vector (the encoder's hidden size) per row, null for rows with an ``error``.
            The encoder's identity (weights hash, pooling, max length) goes into the metadata.
        embedding_dtype: Element type of the ``embedding`` column: ``float32`` or ``float16``
            (half the bytes).
        from_embeddings: Heads-only scoring: ``input`` is a table with an ``embedding`` column (an
            output of ``embeddings=true``) and only the heads run, on those vectors: no tokenizer,
            no encoder, CPU actors even on a GPU cluster. The encoder identity recorded in the
            input's metadata must match the model's encoder. ``text_columns`` and
            ``max_tokens_per_batch`` are not used; ``precision`` must be ``auto`` or ``fp32`` (the
            heads run at fp32); ``truncated`` is copied from the input (null if it has none); rows
            with a null vector get an ``error`` (``no embedding: ...``). With ``embeddings=true``
            the vectors are copied into the output.
        heads: Score only these heads of the model (only their columns are written; heads they
            read through ``inputs_from`` still run); empty: every head.
        max_length: Token limit per row; 0 uses the model's ``max_seq_length``.
        max_tokens_per_batch: Token budget per forward pass (rows x longest row, after
            length-sorting each block); 0 picks the device's default (2048 on CPU, 65536 on GPU).
        block_rows: Rows per actor call (the unit of length sorting).
        num_actors: Inference actors; 0 plans from the cluster (one per GPU, else CPUs minus one).
        num_gpus_per_actor: GPUs per actor; -1 uses 1 when the cluster has GPUs, else 0.
        num_cpus_per_actor: CPUs Ray reserves per actor.
        torch_threads: CPU threads per actor for inference; 0 = all CPUs of the node (see README).
        precision: ``auto`` (bf16/fp16 autocast on GPU; on CPU bf16 where the CPU has native bf16,
            else fp32), ``fp32``, ``bf16``, ``fp16``, or ``int8`` (CPU actors; needs the ``int8`` extra).
        rows_per_file: Rows per work unit: consecutive row groups of one input file, about this
            many rows, become one output file (a few when a kill interrupted it).
        lock_timeout_s: A job holding the output that has not renewed its lease for this long is
            considered dead and its lock is taken over (the lease is renewed every
            ``min(15, lock_timeout_s / 4)`` seconds).
        overwrite: Delete any existing output first (otherwise a rerun resumes).
        progress: Show Ray Data progress bars.
        profile: Record each head's prediction profile (prediction mix, score histogram; see
            ``mtcls.profile``) per output file, merged into the manifest's ``profile``, and compare
            it with the model's reference profile (``drift``).
        drift_threshold: A head whose prediction-mix PSI against the model's reference profile
            exceeds this is flagged in the manifest's ``drift`` and logged (0.2: the usual
            "significant shift" level).
        fail_on_drift: After writing everything and ``_SUCCESS``, exit non-zero when a head is
            flagged, so a scheduler can alert.
    """

    input: str = ""
    output: str = "outputs/score"
    model: str = ""
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    id_column: str = "id"
    passthrough_columns: list[str] = field(default_factory=list)
    embeddings: bool = False
    embedding_dtype: str = "float32"
    from_embeddings: bool = False
    heads: list[str] = field(default_factory=list)
    max_length: int = 0
    max_tokens_per_batch: int = 0
    block_rows: int = 4096
    num_actors: int = 0
    num_gpus_per_actor: float = -1
    num_cpus_per_actor: float = 1.0
    torch_threads: int = 0
    precision: str = "auto"
    rows_per_file: int = 100_000
    lock_timeout_s: float = 120.0
    overwrite: bool = False
    progress: bool = True
    profile: bool = True
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD
    fail_on_drift: bool = False

    def __post_init__(self) -> None:
        if not self.output:
            raise ConfigError("key 'output': an output directory is required")
        if not self.text_columns and not self.from_embeddings:
            raise ConfigError("key 'text_columns': at least one text column is required")
        if not self.id_column:
            raise ConfigError("key 'id_column': an id column is required (rows are matched by id, never by order)")
        if self.lock_timeout_s < 1:
            raise ConfigError(f"key 'lock_timeout_s': must be >= 1 second, got {self.lock_timeout_s}")
        require_at_least(self, 1, "block_rows", "rows_per_file")
        require_at_least(self, 0, "max_length", "max_tokens_per_batch", "num_actors", "torch_threads")
        if self.num_cpus_per_actor <= 0:
            raise ConfigError(f"key 'num_cpus_per_actor': must be > 0, got {self.num_cpus_per_actor}")
        if self.from_embeddings and self.precision not in ("auto", "fp32"):
            raise ConfigError(f"key 'precision': from_embeddings runs only the heads, at fp32 on CPU actors; "
                              f"use auto or fp32, got {self.precision!r}")
        if self.from_embeddings and self.num_gpus_per_actor > 0:
            raise ConfigError("key 'num_gpus_per_actor': from_embeddings runs only the heads, on CPU actors; use 0 or -1")
        if not all(isinstance(h, str) and h for h in self.heads) or len(set(self.heads)) != len(self.heads):
            raise ConfigError(f"key 'heads': expected head names, each once, got {self.heads!r}")
        check_inference_precision(self)
        if not (isinstance(self.drift_threshold, (int, float)) and math.isfinite(self.drift_threshold) and self.drift_threshold > 0):
            raise ConfigError(f"key 'drift_threshold': must be a positive number, got {self.drift_threshold!r}")
        if self.fail_on_drift and not self.profile:
            raise ConfigError("key 'fail_on_drift': needs profile=true (drift is measured on the prediction profile)")
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise ConfigError(f"key 'embedding_dtype': expected one of {list(EMBEDDING_DTYPES)}, got {self.embedding_dtype!r}")
        # from_embeddings reads no text: text_columns are not used, and may be passed through.
        dup = [c for c in self.passthrough_columns if c == self.id_column or (c in self.text_columns and not self.from_embeddings)]
        if dup:
            raise ConfigError(f"key 'passthrough_columns': {dup} already in id_column or text_columns")


