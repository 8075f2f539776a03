"""``ScoreConfig``: the scoring job's keys, validated before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """

    input: str = ""
    output: str = "outputs/score"
    model: str = ""
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    id_column: str = "id"
    passthrough_columns: list[str] = field(default_factory=list)
    embeddings: bool = False
    embedding_dtype: str = "float32"
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

    def __post_init__(self) -> None:
        if not self.output:
            raise ConfigError("key 'output': an output directory is required")
        if not self.text_columns:
            raise ConfigError("key 'text_columns': at least one text column is required")
        if not self.id_column:
            raise ConfigError("key 'id_column': an id column is required (rows are matched by id, never by order)")
        if self.lock_timeout_s < 1:
            raise ConfigError(f"key 'lock_timeout_s': must be >= 1 second, got {self.lock_timeout_s}")
        require_at_least(self, 1, "block_rows", "rows_per_file")
        require_at_least(self, 0, "max_length", "max_tokens_per_batch", "num_actors", "torch_threads")
        if self.num_cpus_per_actor <= 0:
            raise ConfigError(f"key 'num_cpus_per_actor': must be > 0, got {self.num_cpus_per_actor}")
        check_inference_precision(self)
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise ConfigError(f"key 'embedding_dtype': expected one of {list(EMBEDDING_DTYPES)}, got {self.embedding_dtype!r}")
        dup = [c for c in self.passthrough_columns if c == self.id_column or c in self.text_columns]
        if dup:
            raise ConfigError(f"key 'passthrough_columns': {dup} already in id_column or text_columns")


