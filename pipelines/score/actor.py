"""The inference actor: token ids in, every head's predictions out. It does only model work.

Joining and tokenizing happened in the CPU stage before it (:mod:`pipelines.score.stages`); the
actor batches rows by a token budget, runs the forward pass (on its GPU when it has one) and
decodes probabilities into Arrow columns without per-row Python. Rows that cannot be scored keep
their error; a failed forward pass is retried row by row so only the failing rows get an error.
With embeddings, the pooled features the heads saw become a ``fixed_size_list`` column (null
where the row has an error).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtcls import Tokens, decode_arrow
from mtcls.inference import POOLED
from pipelines.inference import load_shipped_engine, predict_with_retry
from pipelines.score.schema import EMBEDDING_COLUMN, ERROR_COLUMN, TRUNCATED_COLUMN
from pipelines.score.stages import IDS, PRECISION


def tokens_from_column(column: pa.ChunkedArray | pa.Array, rows: np.ndarray) -> Tokens:
    """The token ids of the given rows of a ``list<int32>`` column, as flat :class:`Tokens`."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    picked = column.take(pa.array(rows, pa.int64()))
    lengths = pc.list_value_length(picked).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = pc.list_flatten(picked).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return Tokens(ids, offsets, np.zeros(len(rows), dtype=bool))


def embedding_array(pooled: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    """(N, H) pooled features -> ``fixed_size_list<dtype, H>`` from one flat buffer (no per-row Python)."""
    values = np.ascontiguousarray(pooled, dtype=np.dtype(dtype))
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


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


class InferenceActor:
    """Callable class for ``Dataset.map_batches`` (batch format ``pyarrow``) on tokenized blocks.

    Args:
        files_ref: ``[ray.put(model files)]``; the model is loaded once per actor.
        schema: Schema of the blocks it returns (output columns plus the internal ones to carry).
        max_length: Token limit the CPU stage used (recorded; ids arrive already cut).
        max_tokens_per_batch: Token budget per forward pass (0: the device's default).
        torch_threads: Intra-op threads for CPU inference.
        precision: See :mod:`mtcls.precision`.
        embedding_dtype: ``float32`` or ``float16``: also write the pooled features as the
            ``embedding`` column; None: no embeddings.
        heads: Only these heads (the ``heads`` key); None: every head.
    """

    def __init__(self, files_ref: list, schema: pa.Schema, max_length: int, max_tokens_per_batch: int,
                 torch_threads: int, precision: str = "auto", embedding_dtype: str | None = None,
                 heads: list[str] | None = None) -> None:
        self.engine, self._copy = load_shipped_engine(
            files_ref, torch_threads=max(1, torch_threads), precision=precision, max_length=max_length,
            max_tokens_per_batch=max_tokens_per_batch or None, heads=heads)
        self.schema = schema
        self.embedding_dtype = embedding_dtype
        self.precision = f"{self.engine.precision.name}\t{self.engine.precision.reason}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch.column(ERROR_COLUMN)
        rows = np.flatnonzero(errors.is_null().to_numpy(zero_copy_only=False))
        probs, failures = predict_with_retry(self.engine, tokens_from_column(batch.column(IDS), rows),
                                             with_pooled=self.embedding_dtype is not None)
        good = np.fromiter((f is None for f in failures), dtype=bool, count=len(failures))
        if not good.all():  # rows whose forward pass failed carry its message
            messages = errors.to_pylist()
            for i, failure in zip(rows[~good], [f for f in failures if f is not None]):
                messages[i] = failure
            errors = pa.array(messages, pa.string())
        scored = np.zeros(batch.num_rows, dtype=bool)
        scored[rows[good]] = True
        columns: dict[str, pa.Array] = {}
        for name, spec in self.engine.specs.items():
            columns.update(decode_arrow(spec, probs[name][good]))
        if self.embedding_dtype is not None:
            columns[EMBEDDING_COLUMN] = embedding_array(probs[POOLED][good], self.embedding_dtype)
        batch = batch.append_column(PRECISION, pa.repeat(pa.scalar(self.precision, pa.string()), batch.num_rows))
        return assemble(self.schema, batch, scored, columns, errors)
