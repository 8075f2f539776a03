"""The inference actor: text columns in, every head's predictions out, one encoder pass per row.

Ray Data creates one :class:`Predictor` per actor; ``__init__`` loads the model once, ``__call__``
scores one batch. Rows that cannot be scored (empty or non-string text, a failed forward pass) come
out with null predictions and a non-null ``error``; no row is ever dropped.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoTokenizer

from mtcls import MultiTaskModel, decode, join_texts, predict_probabilities, tokenize
from pipelines.schema import ERROR_COLUMN, TRUNCATED_COLUMN

log = logging.getLogger(__name__)

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Predictor:
    """Callable class for ``Dataset.map_batches`` (batch format ``pyarrow``).

    Args:
        model_dir: Local model directory (model + tokenizer).
        schema: The output schema (see :func:`pipelines.schema.output_schema`).
        text_columns: Input columns joined into the text to classify.
        max_length: Token limit; longer texts are truncated and flagged in ``truncated``.
        batch_size: Rows per forward pass (rows are length-sorted inside each block first).
        torch_threads: Intra-op threads for CPU inference.
        precision: ``"auto"`` (bf16 autocast on a GPU that supports it, else fp16 on GPU, fp32 on
            CPU), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    """

    def __init__(
        self,
        model_dir: str,
        schema: pa.Schema,
        text_columns: list[str],
        max_length: int,
        batch_size: int,
        torch_threads: int,
        precision: str = "auto",
    ) -> None:
        torch.set_num_threads(max(1, torch_threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = MultiTaskModel.from_pretrained(model_dir).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.separator = self.model.config.text_separator or f" {self.tokenizer.sep_token or ' '} "
        self.schema = schema
        self.text_columns = text_columns
        self.max_length = max_length
        self.batch_size = batch_size
        self.autocast = self._autocast_dtype(precision)
        self.pad_id = self.tokenizer.pad_token_id or 0

    def _autocast_dtype(self, precision: str) -> Optional[torch.dtype]:
        if precision == "fp32" or (precision == "auto" and self.device.type == "cpu"):
            return None
        if precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return _AUTOCAST[precision]

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        texts, errors = join_texts({c: batch.column(c).to_pylist() for c in self.text_columns}, self.separator)
        ok = [i for i in range(n) if texts[i] is not None]
        truncated: list[Optional[bool]] = [None] * n
        columns: dict[str, list[Any]] = {}
        if ok:
            scored, failures = self._score([texts[i] for i in ok])
            for j, i in enumerate(ok):
                if failures[j] is not None:
                    errors[i] = failures[j]
                else:
                    truncated[i] = bool(scored["truncated"][j])
            for name, values in scored.items():
                if name == "truncated":
                    continue
                full: list[Any] = [None] * n
                for j, i in enumerate(ok):
                    if failures[j] is None:
                        full[i] = values[j]
                columns[name] = full
        arrays = []
        for field in self.schema:
            if field.name in batch.column_names and field.name not in columns:
                arrays.append(batch.column(field.name).cast(field.type))
            elif field.name == TRUNCATED_COLUMN:
                arrays.append(pa.array(truncated, pa.bool_()))
            elif field.name == ERROR_COLUMN:
                arrays.append(pa.array(errors, pa.string()))
            else:
                arrays.append(pa.array(columns.get(field.name, [None] * n), field.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def _score(self, texts: list[str]) -> tuple[dict[str, list[Any]], list[Optional[str]]]:
        """Scores texts; if the batch fails, retries row by row so only the bad rows fail."""
        try:
            return self._predict(texts), [None] * len(texts)
        except Exception as exc:  # noqa: BLE001 - any failure becomes a per-row error, never a lost row
            log.warning("batch of %d rows failed (%s); retrying row by row", len(texts), exc)
        merged: dict[str, list[Any]] = {}
        failures: list[Optional[str]] = []
        for text in texts:
            try:
                one = self._predict([text])
                failures.append(None)
            except Exception as exc:  # noqa: BLE001
                one = None
                failures.append(f"inference failed: {type(exc).__name__}: {exc}"[:500])
            for name, spec_cols in (one or {}).items():
                merged.setdefault(name, [None] * (len(failures) - 1)).append(spec_cols[0])
            for values in merged.values():
                if len(values) < len(failures):
                    values.append(None)
        return merged, failures

    def _predict(self, texts: list[str]) -> dict[str, list[Any]]:
        ids, truncated = tokenize(self.tokenizer, texts, self.max_length)
        probs = predict_probabilities(self.model, ids, self.batch_size, self.pad_id, self.autocast)
        out: dict[str, list[Any]] = {}
        for name, spec in self.model.specs.items():
            for column, values in decode(spec, probs[name]).items():
                out[column] = values.tolist() if isinstance(values, np.ndarray) else values
        out["truncated"] = truncated.tolist()
        return out

