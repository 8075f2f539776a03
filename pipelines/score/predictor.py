"""The inference actor: text columns in, every head's predictions out, one encoder pass per row.

Ray Data creates one :class:`Predictor` per actor; ``__init__`` loads the model once (through
:class:`mtcls.InferenceEngine`), ``__call__`` scores one block. Rows that cannot be scored (empty or
non-string text, a failed forward pass) come out with null predictions and a non-null ``error``;
no row is ever dropped.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa

from mtcls import InferenceEngine, decode_arrow
from pipelines.inference import load_shipped_engine, predict_with_retry, texts_from_columns
from pipelines.score.schema import ERROR_COLUMN, TRUNCATED_COLUMN


def assemble(schema: pa.Schema, batch: pa.Table, scored: np.ndarray, columns: dict[str, pa.Array],
             truncated: np.ndarray, errors: list[Optional[str]]) -> pa.Table:
    """The output block: pass-through columns, head columns (null where not scored), status columns.

    Args:
        schema: The output schema.
        batch: The input block (pass-through columns are taken from it).
        scored: (N,) bool, rows that have predictions.
        columns: Head columns for the scored rows only, in block order.
        truncated: (N,) bool, meaningful where scored.
        errors: Per-row error message or None.
    """
    n = batch.num_rows
    # Scored row j of the block is row j of ``columns``; unscored rows take a null.
    positions = np.full(n, -1, dtype=np.int64)
    positions[scored] = np.arange(int(scored.sum()))
    take = pa.array(positions, mask=~scored) if not scored.all() else None
    arrays = []
    for field in schema:
        if field.name in columns:
            values = columns[field.name]
            arrays.append((values.take(take) if take is not None else values).cast(field.type))
        elif field.name == TRUNCATED_COLUMN:
            arrays.append(pa.array(truncated, pa.bool_(), mask=~scored))
        elif field.name == ERROR_COLUMN:
            arrays.append(pa.array(errors, pa.string()))
        elif field.name in batch.column_names:
            arrays.append(batch.column(field.name).cast(field.type))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


class Predictor:
    """Callable class for ``Dataset.map_batches`` (batch format ``pyarrow``).

    Args:
        model_dir: Local model directory (model + tokenizer).
        schema: The output schema (see :func:`pipelines.score.schema.output_schema`).
        text_columns: Input columns joined into the text to classify.
        max_length: Token limit; longer texts are truncated and flagged in ``truncated``.
        max_tokens_per_batch: Token budget per forward pass (0: the device's default).
        torch_threads: Intra-op threads for CPU inference.
        precision: See :mod:`mtcls.precision`.
    """

    def __init__(self, model_dir: str, schema: pa.Schema, text_columns: list[str], max_length: int,
                 max_tokens_per_batch: int, torch_threads: int, precision: str = "auto") -> None:
        self.engine = InferenceEngine.load(model_dir, torch_threads=max(1, torch_threads), precision=precision,
                                           max_length=max_length, max_tokens_per_batch=max_tokens_per_batch or None)
        self.schema = schema
        self.text_columns = text_columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts, rows, errors = texts_from_columns(batch, self.text_columns, self.engine.separator)
        tokens = self.engine.tokenize(texts)
        probs, failures = predict_with_retry(self.engine, tokens)
        good = np.array([f is None for f in failures], dtype=bool)
        for i, failure in zip(rows[~good], np.array(failures, dtype=object)[~good]):
            errors[i] = failure
        scored = np.zeros(batch.num_rows, dtype=bool)
        scored[rows[good]] = True
        truncated = np.zeros(batch.num_rows, dtype=bool)
        truncated[rows] = tokens.truncated
        columns: dict[str, pa.Array] = {}
        for name, spec in self.engine.specs.items():
            columns.update(decode_arrow(spec, probs[name][good]))
        return assemble(self.schema, batch, scored, columns, truncated, errors)


class ShippedPredictor(Predictor):
    """A :class:`Predictor` whose model files arrive through the object store, so any node can load them.

    The local copy of the model is removed when the actor ends.
    """

    def __init__(self, files_ref: list, schema: pa.Schema, text_columns: list[str], max_length: int,
                 max_tokens_per_batch: int, torch_threads: int, precision: str = "auto") -> None:
        self.engine, self._copy = load_shipped_engine(
            files_ref, torch_threads=max(1, torch_threads), precision=precision, max_length=max_length,
            max_tokens_per_batch=max_tokens_per_batch or None)
        self.schema = schema
        self.text_columns = text_columns
