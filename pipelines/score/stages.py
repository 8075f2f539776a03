"""The scoring job's source stage: read a unit's rows, join and validate the text, tokenize.

The block it returns carries the pass-through columns plus the internal columns of
:mod:`pipelines.blocks` (``__unit``, ``__row``, ``__ids``) and ``error`` / ``truncated``.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
import pyarrow as pa

from mtcls import tokenize_flat
from pipelines.blocks import IDS, ROW, UNIT
from pipelines.inference import CHARS_PER_TOKEN, texts_from_columns
from pipelines.sink.schema import ERROR_COLUMN, TRUNCATED_COLUMN
from pipelines.sink.units import read_unit


class _TokenizerCache:
    """One parsed tokenizer per worker process (parsing the JSON costs tens of ms)."""

    _cache: dict[str, Any] = {}

    @classmethod
    def get(cls, tokenizer_files: dict[str, bytes], digest: str) -> Any:
        if digest not in cls._cache:
            import tempfile

            from transformers import AutoTokenizer

            with tempfile.TemporaryDirectory() as tmp:
                for name, data in tokenizer_files.items():
                    with open(posixpath.join(tmp, name), "wb") as fh:
                        fh.write(data)
                cls._cache[digest] = AutoTokenizer.from_pretrained(tmp)
        return cls._cache[digest]


def read_and_tokenize(batch: dict[str, np.ndarray], units: list[dict[str, Any]], in_fs: Any, columns: list[str],
                      text_columns: list[str], separator: str, max_length: int, tokenizer_ref: list) -> pa.Table:
    """Ray Data ``map_batches`` function: unit indices in, one tokenized block per unit out.

    Reads the unit's rows, drops rows already in the output (a resumed unit), joins and
    validates the text columns and tokenizes with the ``tokenizers`` batch API.
    """
    import ray

    files, digest = ray.get(tokenizer_ref[0])
    tokenizer = _TokenizerCache.get(files, digest)
    tables = [tokenize_block(*read_unit(units[int(i)], in_fs, columns), int(i), columns, text_columns, separator, max_length, tokenizer)
              for i in batch["unit"]]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def tokenize_block(table: pa.Table, rows: np.ndarray, unit: int, columns: list[str], text_columns: list[str],
                   separator: str, max_length: int, tokenizer: Any) -> pa.Table:
    """Rows of one unit -> the block the inference actor takes.

    Args:
        table: The rows (pass-through and text columns).
        rows: Their row numbers in the input file.
        unit: The unit's index.
        columns: Columns read; the first is the id, text columns other than it are not passed on.
        text_columns: Joined with ``separator`` into the text.
        separator: See :func:`mtcls.text_separator`.
        max_length: Token limit (cells are also trimmed to ``CHARS_PER_TOKEN * max_length`` characters).
        tokenizer: A fast tokenizer.
    """
    texts, ok, errors, trimmed = texts_from_columns(table, text_columns, separator, max_chars=CHARS_PER_TOKEN * max_length)
    tokens = tokenize_flat(tokenizer, texts, max_length)
    lengths = np.zeros(table.num_rows, dtype=np.int32)
    lengths[ok] = tokens.lengths
    offsets = np.zeros(table.num_rows + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    has_text = np.zeros(table.num_rows, dtype=bool)
    has_text[ok] = True
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens.ids, pa.int32()), mask=pa.array(~has_text))
    truncated = trimmed & has_text
    truncated[ok] |= tokens.truncated
    passthrough = [c for c in columns if c not in text_columns or c == columns[0]]
    out = {c: table.column(c) for c in dict.fromkeys(passthrough)}
    out.update({
        UNIT: pa.array(np.full(table.num_rows, unit, dtype=np.int32)),
        ROW: pa.array(rows),
        IDS: ids,
        ERROR_COLUMN: pa.array(errors, pa.string()),
        TRUNCATED_COLUMN: pa.array(truncated),
    })
    return pa.table(out)
