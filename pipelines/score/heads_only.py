"""Heads-only scoring (``from_embeddings=true``): the model's heads on the ``embedding`` column of an earlier output.

    units (from the input footers, as for text)
      -> read_embeddings   CPU tasks    read the vectors; a null one becomes the row's ``error``
      -> InferenceActor    CPU actors   input "pooled": the heads and their calibration on the vectors
      -> the sink          unchanged: commits, resume, verification and the lock are the text path's

No tokenizer and no encoder pass. Before any work, :func:`check_embedding_input` proves that every
input file's vectors come from the model's encoder: the file's Parquet metadata (key ``mtcls``,
written by ``jobs.score embeddings=true``) records the encoder identity
(:func:`mtcls.encoder_identity`), whose encoder hash (weights and config) and pooling must equal the model's; and its
``embedding`` column must hold vectors of the encoder's hidden size.

Between the stages a block carries, besides the id, pass-through and internal columns of
:mod:`pipelines.blocks`:

    __embedding  fixed_size_list<float32, H>  the row's vector (zeros where the row has an error)
    error        string                       ``no embedding: ...`` for a row without a vector
    truncated    bool                         the input's ``truncated`` column; null if it has none
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.blocks import EMBEDDING_IN, ROW, UNIT
from pipelines.config import ConfigError
from pipelines.sink.schema import EMBEDDING_COLUMN, ERROR_COLUMN, METADATA_KEY, TRUNCATED_COLUMN
from pipelines.sink.units import read_unit
from pipelines.storage import InputError, Location, read_footer


@dataclass
class EmbeddingSource:
    """What :func:`check_embedding_input` established about the input.

    Attributes:
        encoder: The encoder identity recorded by the input (the encoder's hash of weights and config, and pooling;
            the ``max_length`` the vectors were computed with).
        text_columns: The text columns the input's vectors were computed from (its metadata), or [].
        width: Values per vector (the encoder's hidden size).
    """

    encoder: dict[str, Any]
    text_columns: list[str]
    width: int


def check_embedding_input(loc: Location, files: list[str], model_encoder: dict[str, Any], width: int,
                          max_length: int = 0) -> EmbeddingSource:
    """Proves, from the footers, that every input file holds vectors of the model's encoder.

    Args:
        loc: Where the input files are.
        files: Their paths.
        model_encoder: :func:`mtcls.encoder_identity` of the model.
        width: The encoder's hidden size.
        max_length: The job's ``max_length`` key (0: not set).

    Raises:
        InputError: Naming the file: no ``embedding`` column, a column that is not a list of
            floats or has vectors of another width, no recorded encoder identity, or vectors of
            another encoder (naming both encoder hashes) or pooling.
        ConfigError: Naming ``max_length`` when it differs from the one the vectors were computed with.
    """
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(files)))) as pool:
        schemas = list(pool.map(lambda p: read_footer(loc, p)[0], files))
    first: Optional[tuple[str, dict[str, Any], dict[str, Any]]] = None
    for path, schema in zip(files, schemas):
        uri = loc.uri(path)
        if EMBEDDING_COLUMN not in schema.names:
            raise InputError(f"Parquet file {uri!r} has no column {EMBEDDING_COLUMN!r} (from_embeddings reads the vectors "
                             f"written by jobs.score embeddings=true); its columns: {schema.names}")
        _check_type(uri, schema.field(EMBEDDING_COLUMN).type, width)
        try:
            meta = json.loads((schema.metadata or {}).get(METADATA_KEY, b"{}"))
        except ValueError:
            meta = {}
        encoder = meta.get("encoder") if isinstance(meta, dict) else None
        if not isinstance(encoder, dict) or not encoder.get("encoder_sha256"):
            raise InputError(f"Parquet file {uri!r} records no encoder identity (schema metadata {METADATA_KEY.decode()!r}, key "
                             "'encoder', written by jobs.score embeddings=true): nothing shows its embeddings come from the "
                             "model's encoder; score the text instead (from_embeddings=false)")
        if encoder["encoder_sha256"] != model_encoder["encoder_sha256"]:
            raise InputError(f"Parquet file {uri!r}: its embeddings come from the encoder with sha256 (weights and config) "
                             f"{encoder['encoder_sha256']}, but the model's encoder has sha256 {model_encoder['encoder_sha256']}; "
                             "heads-only scoring needs the encoder that wrote them: score the text instead (from_embeddings=false)")
        if encoder.get("pooling") != model_encoder["pooling"]:
            raise InputError(f"Parquet file {uri!r}: its embeddings were pooled by {encoder.get('pooling')!r}, the model pools "
                             f"by {model_encoder['pooling']!r}; score the text instead (from_embeddings=false)")
        if first is None:
            first = (uri, encoder, meta)
        elif encoder.get("max_length") != first[1].get("max_length"):
            raise InputError(f"Parquet file {uri!r}: its embeddings were computed at max_length={encoder.get('max_length')}, "
                             f"those of {first[0]!r} at {first[1].get('max_length')}; score them separately")
    assert first is not None
    _, encoder, meta = first
    if max_length and max_length != encoder.get("max_length"):
        raise ConfigError(f"key 'max_length': the input's embeddings were computed at max_length={encoder.get('max_length')}; "
                          "from_embeddings cannot change it (leave max_length at 0)")
    return EmbeddingSource(encoder=dict(encoder), text_columns=list(meta.get("text_columns") or []), width=width)


def _check_type(uri: str, t: pa.DataType, width: int) -> None:
    lists = pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)
    if not lists or not pa.types.is_floating(t.value_type):
        raise InputError(f"Parquet file {uri!r}: column {EMBEDDING_COLUMN!r} is {t}, expected a list of floats "
                         f"(fixed_size_list<float32, {width}>, as jobs.score embeddings=true writes it)")
    if pa.types.is_fixed_size_list(t) and t.list_size != width:
        raise InputError(f"Parquet file {uri!r}, row 0 (and every other row: the column is {t}): its embedding has "
                         f"{t.list_size} values, but the model's encoder gives {width}")


def read_embeddings(batch: dict[str, np.ndarray], units: list[dict[str, Any]], in_fs: Any, columns: list[str],
                    width: int, uris: list[str]) -> pa.Table:
    """Ray Data ``map_batches`` function: unit indices in, one block of vectors per unit out.

    Reads the unit's row groups (dropping rows already in the output), its ``embedding`` column
    and, where the file has them, its ``error`` and ``truncated`` columns.

    Raises:
        InputError: Naming the file, the row and its id, when a vector has another width than ``width``
            (fails the job: no row is lost).
    """
    tables = [_embedding_unit(units[int(i)], int(i), in_fs, columns, width, uris[units[int(i)]["file"]]) for i in batch["unit"]]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _embedding_unit(unit: dict[str, Any], index: int, in_fs: Any, columns: list[str], width: int, uri: str) -> pa.Table:
    table, rows = read_unit(unit, in_fs, list(dict.fromkeys([*columns, EMBEDDING_COLUMN])), optional=(ERROR_COLUMN, TRUNCATED_COLUMN))
    n = table.num_rows
    vectors, null = _vectors(table.column(EMBEDDING_COLUMN), width, uri, rows, table.column(columns[0]))
    bad = null | ~np.isfinite(vectors).all(axis=1)
    errors: pa.Array = pa.nulls(n, pa.string())
    if bad.any():
        vectors[bad] = 0.0
        given = table.column(ERROR_COLUMN).to_pylist() if ERROR_COLUMN in table.column_names else [None] * n
        messages: list[Optional[str]] = [None] * n
        for i in np.flatnonzero(bad):
            why = given[i] if null[i] and given[i] else (f"{EMBEDDING_COLUMN!r} is null in the input" if null[i]
                                                         else "the input's vector holds NaN or infinite values")
            messages[i] = f"no embedding: {why}"
        errors = pa.array(messages, pa.string())
    truncated = table.column(TRUNCATED_COLUMN).cast(pa.bool_()) if TRUNCATED_COLUMN in table.column_names else pa.nulls(n, pa.bool_())
    out = {c: table.column(c) for c in columns}
    out.update({
        UNIT: pa.array(np.full(n, index, dtype=np.int32)),
        ROW: pa.array(rows),
        EMBEDDING_IN: pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), width),
        ERROR_COLUMN: errors,
        TRUNCATED_COLUMN: truncated,
    })
    return pa.table(out)


def _vectors(column: pa.ChunkedArray, width: int, uri: str, rows: np.ndarray, ids: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> ((N, width) float32, (N,) bool null), one flat buffer, no per-row Python."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(array)
    null = array.is_null().to_numpy(zero_copy_only=False).astype(bool)
    if pa.types.is_fixed_size_list(array.type):  # its width was checked from the footer
        flat = array.values.slice(array.offset * width, n * width)
    else:
        lengths = pc.list_value_length(array).fill_null(width).to_numpy(zero_copy_only=False)
        wrong = np.flatnonzero(lengths != width)
        if len(wrong):
            i = int(wrong[0])
            raise InputError(f"Parquet file {uri!r}, row {int(rows[i])} (id {ids[i].as_py()!r}): its embedding has "
                             f"{int(lengths[i])} values, but the model's encoder gives {width}")
        flat = pc.list_flatten(array)  # null rows hold no values
    values = flat.cast(pa.float32()).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if pa.types.is_fixed_size_list(array.type):
        return values.reshape(n, width).copy(), null
    vectors = np.zeros((n, width), np.float32)
    vectors[~null] = values.reshape(-1, width)
    return vectors, null
