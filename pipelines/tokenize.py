"""The tokenizing CPU stage every text pipeline uses: join and validate text columns, tokenize, no per-row model work.

The tokenizer travels to the CPU tasks as its files (:func:`ship_tokenizer`) and is parsed once
per worker process. A block comes out with the kept columns, ``__ids`` (``list<int32>``, null
where the row has no text), ``error`` and ``truncated``.
"""

from __future__ import annotations

import hashlib
import posixpath
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mtcls import tokenize
from pipelines.blocks import IDS
from pipelines.inference import CHARS_PER_TOKEN, texts_from_columns
from pipelines.sink.schema import ERROR_COLUMN, TRUNCATED_COLUMN


def ship_tokenizer(model_dir: Path) -> tuple[dict[str, bytes], str]:
    """The model directory's tokenizer files (everything but the weights) and their digest, for ``ray.put``."""
    files = {p.name: p.read_bytes() for p in Path(model_dir).iterdir() if p.is_file() and not p.name.endswith(".safetensors")
             and not p.name.endswith(".onnx")}
    return files, hashlib.sha1(b"".join(files[k] for k in sorted(files))).hexdigest()


class _TokenizerCache:
    """One parsed tokenizer per worker process (parsing the JSON costs tens of ms)."""

    _cache: dict[str, Any] = {}

    @classmethod
    def get(cls, shipped: tuple[dict[str, bytes], str]) -> Any:
        files, digest = shipped
        if digest not in cls._cache:
            import tempfile

            from transformers import AutoTokenizer

            with tempfile.TemporaryDirectory() as tmp:
                for name, data in files.items():
                    with open(posixpath.join(tmp, name), "wb") as fh:
                        fh.write(data)
                cls._cache[digest] = AutoTokenizer.from_pretrained(tmp)
        return cls._cache[digest]


def shipped_tokenizer(tokenizer_ref: list) -> Any:
    """The tokenizer of ``[ray.put(ship_tokenizer(dir))]`` (or ``[ship_tokenizer(dir)]`` in one
    process), parsed once per process."""
    import ray

    shipped = tokenizer_ref[0]
    return _TokenizerCache.get(ray.get(shipped) if isinstance(shipped, ray.ObjectRef) else shipped)


def tokenize_block(table: pa.Table, keep: list[str], text_columns: list[str], separator: str, max_length: int,
                   tokenizer: Any) -> pa.Table:
    """Rows -> the block the inference actor takes.

    Args:
        table: The rows.
        keep: Columns passed on unchanged (ids, labels, slices ...).
        text_columns: Joined with ``separator`` into the text.
        separator: See :func:`mtcls.text_separator`.
        max_length: Token limit (cells are also trimmed to ``CHARS_PER_TOKEN * max_length``
            characters first; a trimmed row is marked truncated).
        tokenizer: A fast tokenizer.
    """
    texts, ok, errors, trimmed = texts_from_columns(table, text_columns, separator, max_chars=CHARS_PER_TOKEN * max_length)
    tokens = tokenize(tokenizer, texts, max_length)
    lengths = np.zeros(table.num_rows, dtype=np.int32)
    lengths[ok] = tokens.lengths
    offsets = np.zeros(table.num_rows + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    has_text = np.zeros(table.num_rows, dtype=bool)
    has_text[ok] = True
    truncated = trimmed & has_text
    truncated[ok] |= tokens.truncated
    out = {c: table.column(c) for c in dict.fromkeys(keep)}
    out.update({
        IDS: pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens.ids, pa.int32()), mask=pa.array(~has_text)),
        ERROR_COLUMN: pa.array(errors, pa.string()),
        TRUNCATED_COLUMN: pa.array(truncated),
    })
    return pa.table(out)


def tokenize_stage(batch: pa.Table, keep: list[str], text_columns: list[str], separator: str, max_length: int,
                   tokenizer_ref: list) -> pa.Table:
    """Ray Data ``map_batches`` function (batch format ``pyarrow``): :func:`tokenize_block` on a block of rows."""
    return tokenize_block(batch, keep, text_columns, separator, max_length, shipped_tokenizer(tokenizer_ref))
