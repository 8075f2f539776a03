"""The inference actor every pipeline uses: rows with token ids or pooled vectors in, predictions out.

    source stage (CPU tasks: read, validate, tokenize, or read vectors)
      -> InferenceActor      one per GPU (CPU actors otherwise); only model work
      -> a sink (write + commit) or a statistics stage (evaluation)

One class, two choices:

- the input: :class:`TokenIds` (``__ids``: the encoder and the heads run) or
  :class:`PooledVectors` (``__embedding``: only the heads run, at fp32 on CPU);
- the output: :class:`ScoredColumns` (the output table's columns, decoded without per-row Python,
  for scoring and evaluation) or :class:`PooledFeatures` (the pooled features as a tensor column,
  for training on cached features).

Rows that cannot be scored keep their ``error``; a failed forward pass is retried row by row so
only the failing rows get an error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtcls import EngineOutput, InferenceEngine, Tokens, decode_arrow
from pipelines.blocks import EMBEDDING_IN, IDS, PRECISION, precision_column
from pipelines.inference import load_shipped_engine, predict_with_retry
from pipelines.sink.schema import EMBEDDING_COLUMN, ERROR_COLUMN, TRUNCATED_COLUMN

#: Prefix of the tensor columns that carry a head's probabilities without its temperature.
UNCALIBRATED_PREFIX = "__uncalibrated_"
#: What a heads-only actor records as its precision reason.
HEADS_ONLY_REASON = "heads only, at fp32 on CPU, on the input's embedding vectors (no encoder pass)"


def read_tokens(column: pa.ChunkedArray | pa.Array, rows: Optional[np.ndarray] = None) -> Tokens:
    """The token ids of a ``list<int32>`` column (or of the given rows of it), as flat :class:`Tokens`.

    No per-row Python objects: the offsets and values are read from the Arrow buffers.
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if rows is not None:
        arr = arr.take(pa.array(rows, pa.int64()))
    offsets = arr.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    if arr.null_count:  # a null list may still span values in the buffer
        lengths = np.where(arr.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    out_offsets = np.zeros(len(arr) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_offsets[1:])
    return Tokens(flat, out_offsets, np.zeros(len(arr), dtype=bool))


def read_vectors(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A ``fixed_size_list<float32, width>`` column -> (N, width) float32 (one flat buffer)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = arr.values.slice(arr.offset * width, len(arr) * width)
    return flat.to_numpy(zero_copy_only=False).reshape(len(arr), width)


def embedding_array(pooled: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    """(N, H) pooled features -> ``fixed_size_list<dtype, H>`` from one flat buffer (no per-row Python)."""
    values = np.ascontiguousarray(pooled, dtype=np.dtype(dtype))
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


@dataclass
class Predictions:
    """What the engine gave for the rows of a block that have an input.

    Attributes:
        rows: Their positions in the block.
        out: The engine's output for those rows, in order (NaN where ``failures`` says so).
        failures: Per row, why its forward pass failed (None: it has predictions).
        tokens: Token ids of those rows (0: heads only).
        padded_tokens: Token slots of the forward batches, padding included.
    """

    rows: np.ndarray
    out: EngineOutput
    failures: list[Optional[str]]
    tokens: int = 0
    padded_tokens: int = 0

    @property
    def good(self) -> np.ndarray:
        return np.fromiter((f is None for f in self.failures), dtype=bool, count=len(self.failures))


@dataclass
class _CountedTokens(Tokens):
    """:class:`Tokens` that add up the padded size of each forward batch the engine cuts from them."""

    slots: int = 0

    def padded(self, index: np.ndarray, pad_id: int) -> Any:
        ids, mask = super().padded(index, pad_id)
        self.slots += int(ids.numel())
        return ids, mask


class TokenIds:
    """Input: token ids in a ``list<int32>`` column (``__ids``, from the tokenizing CPU stage); the encoder and the heads run.

    Args:
        column: The column that holds them.
    """

    engine_defaults: dict[str, Any] = {}

    def __init__(self, column: str = IDS) -> None:
        self.column = column

    def predict(self, engine: InferenceEngine, batch: pa.Table, rows: np.ndarray, with_pooled: bool) -> Predictions:
        tokens = read_tokens(batch.column(self.column), rows)
        counted = _CountedTokens(tokens.ids, tokens.offsets, tokens.truncated)
        out, failures = predict_with_retry(engine, counted, with_pooled=with_pooled)
        return Predictions(rows, out, failures, tokens=int(tokens.offsets[-1]), padded_tokens=counted.slots)


class PooledVectors:
    """Input: pooled encoder features in a ``fixed_size_list`` column (``__embedding``); only the heads run (fp32, CPU, no tokenizer).

    Args:
        column: The column that holds them.
    """

    engine_defaults: dict[str, Any] = {"precision": "fp32", "device": "cpu", "with_tokenizer": False}

    def __init__(self, column: str = EMBEDDING_IN) -> None:
        self.column = column

    def predict(self, engine: InferenceEngine, batch: pa.Table, rows: np.ndarray, with_pooled: bool) -> Predictions:
        vectors = read_vectors(batch.column(self.column), engine.model.config.hidden_size)[rows]
        out = engine.predict_pooled(vectors)
        if with_pooled:
            out.pooled = vectors
        return Predictions(rows, out, [None] * len(rows))


class ScoredColumns:
    """Output: the block in ``schema``: its own columns, every head's decoded columns (null where
    not scored), ``embedding`` if the schema has it, ``error``, ``truncated``, and ``__precision``.

    With an engine made ``with_uncalibrated`` (evaluation), each head that has a temperature also
    gets a tensor column ``__uncalibrated_<head>`` (its probabilities without it).

    Args:
        schema: Schema of the block to build (output columns plus the internal ones to carry).
    """

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.embedding_dtype: Optional[str] = None
        if EMBEDDING_COLUMN in schema.names:
            self.embedding_dtype = "float16" if pa.types.is_float16(schema.field(EMBEDDING_COLUMN).type.value_type) else "float32"

    @property
    def with_pooled(self) -> bool:
        return self.embedding_dtype is not None

    def build(self, engine: InferenceEngine, batch: pa.Table, pred: Predictions, errors: pa.Array, precision: dict) -> pa.Table:
        good = pred.good
        scored = np.zeros(batch.num_rows, dtype=bool)
        scored[pred.rows[good]] = True
        columns: dict[str, pa.Array] = {}
        for name, spec in engine.specs.items():
            columns.update(decode_arrow(spec, pred.out.probs[name][good]))
        if self.embedding_dtype is not None:
            columns[EMBEDDING_COLUMN] = embedding_array(pred.out.pooled[good], self.embedding_dtype)
        out = assemble(self.schema, batch.append_column(PRECISION, precision_column(precision, batch.num_rows)),
                       scored, columns, errors)
        if engine.with_uncalibrated:
            from ray.data.extensions import ArrowTensorArray

            for name, probs in pred.out.uncalibrated.items():
                full = np.full((batch.num_rows, *probs.shape[1:]), np.nan, np.float32)
                full[scored] = probs[good]
                out = out.append_column(UNCALIBRATED_PREFIX + name, ArrowTensorArray.from_numpy(full))
        return out


class PooledFeatures:
    """Output: the block without its token ids, with ``length`` (tokens per row) and ``features``
    ((N, hidden) float32, a tensor column): the cached features of frozen-encoder training.

    Args:
        column: The token-id column to replace.
    """

    with_pooled = True

    def __init__(self, column: str = IDS) -> None:
        self.column = column

    def build(self, engine: InferenceEngine, batch: pa.Table, pred: Predictions, errors: pa.Array, precision: dict) -> pa.Table:
        from ray.data.extensions import ArrowTensorArray

        failed = [f for f in pred.failures if f is not None]
        if failed:  # training needs every row's features: fail the task (Ray retries it), never drop a row
            raise RuntimeError(f"{len(failed)} rows of a feature block failed: {failed[0]}")
        out = batch.drop_columns([self.column])
        lengths = read_tokens(batch.column(self.column)).lengths.astype(np.int32)
        out = out.append_column("length", pa.array(lengths))
        return out.append_column("features", ArrowTensorArray.from_numpy(pred.out.pooled))


def assemble(schema: pa.Schema, batch: pa.Table, scored: np.ndarray, columns: dict[str, pa.Array],
             errors: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The output block: batch columns, head columns (null where not scored), status columns.

    Args:
        schema: Schema of the block to build (every field is taken from ``columns`` or ``batch``).
        batch: The input block.
        scored: (N,) bool, rows that have predictions.
        columns: Head columns for the scored rows only, in block order.
        errors: Per-row error message (null where scored).
    """
    n = batch.num_rows
    positions = np.full(n, -1, dtype=np.int64)
    positions[scored] = np.arange(int(scored.sum()))
    take = None if scored.all() else pa.array(positions, mask=~scored)
    arrays = []
    for field in schema:
        if field.name in columns:
            values = columns[field.name]
            arrays.append((values if take is None else values.take(take)).cast(field.type))
        elif field.name == ERROR_COLUMN:
            arrays.append(errors)
        elif field.name == TRUNCATED_COLUMN:
            column = batch.column(TRUNCATED_COLUMN)  # null: unknown (heads-only scoring of an input without it)
            truncated = column.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
            unknown = column.is_null().to_numpy(zero_copy_only=False)
            arrays.append(pa.array(truncated, pa.bool_(), mask=~scored | unknown))
        else:
            arrays.append(batch.column(field.name).cast(field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


INPUTS = {"tokens": TokenIds, "pooled": PooledVectors}


class InferenceActor:
    """Callable class for ``Dataset.map_batches`` (batch format ``pyarrow``): the model on a block.

    Args:
        files_ref: ``[ray.put(model files)]``; the model is loaded once per actor.
        inputs: :class:`TokenIds` or :class:`PooledVectors` (or their names, ``"tokens"`` and
            ``"pooled"``, for the default columns).
        output: What to build from the predictions (:class:`ScoredColumns` or :class:`PooledFeatures`).
        training_precision: Run at the precision a training forward pass would use on this
            actor's device for this training ``precision`` key (:func:`mtcls.precision.training_autocast`;
            the cached-feature pass), instead of an inference ``precision``.
        metrics: Record per-block metrics: :class:`pipelines.metrics.ScoringBlockMetrics` arguments
            (``tags``, ``stats_key``); None: none.
        **engine_kwargs: :meth:`mtcls.InferenceEngine.load` arguments (``torch_threads``,
            ``precision``, ``max_length``, ``heads``, ...), over the input's defaults.
    """

    def __init__(self, files_ref: list, inputs: Union[str, TokenIds, PooledVectors], output: Union[ScoredColumns, PooledFeatures],
                 metrics: Optional[dict[str, Any]] = None, training_precision: Optional[str] = None, **engine_kwargs: Any) -> None:
        import ray
        import torch

        from mtcls.precision import training_precision_name
        from pipelines.metrics import ScoringBlockMetrics

        self.input = INPUTS[inputs]() if isinstance(inputs, str) else inputs
        kwargs = {**self.input.engine_defaults, **engine_kwargs}
        if training_precision is not None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            kwargs.update(device=device, precision=training_precision_name(training_precision, device))
        kwargs["torch_threads"] = max(1, int(kwargs.get("torch_threads") or 1))
        self.engine, self._copy = load_shipped_engine(files_ref, **kwargs)
        self.output = output
        precision = self.engine.precision
        reason = HEADS_ONLY_REASON if isinstance(self.input, PooledVectors) else precision.reason
        gpus = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
        self.precision = {"name": precision.name, "reason": reason, "torch": self.engine.device.type, "ray_gpu_ids": gpus}
        self.metrics = ScoringBlockMetrics(**metrics) if metrics is not None else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        errors = batch.column(ERROR_COLUMN) if ERROR_COLUMN in batch.column_names else pa.nulls(batch.num_rows, pa.string())
        if isinstance(errors, pa.ChunkedArray):
            errors = errors.combine_chunks()
        rows = np.flatnonzero(errors.is_null().to_numpy(zero_copy_only=False))
        pred = self.input.predict(self.engine, batch, rows, with_pooled=self.output.with_pooled)
        good = pred.good
        if not good.all():  # rows whose forward pass failed carry its message
            messages = errors.to_pylist()
            for i, failure in zip(rows[~good], [f for f in pred.failures if f is not None]):
                messages[i] = failure
            errors = pa.array(messages, pa.string())
        out = self.output.build(self.engine, batch, pred, errors, self.precision)
        if self.metrics is not None:  # a few numbers per block, never per row
            scored = int(good.sum())
            self.metrics.record(time.perf_counter() - started, scored, batch.num_rows - scored, pred.tokens, pred.padded_tokens,
                                {name: probs[good] for name, probs in pred.out.probs.items()}, self.engine.device)
        return out
