"""What every committed output file records, and the checksums that prove exactly-once.

Light on purpose (numpy, pandas, pyarrow only): the verification tasks import it on any worker.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

#: Parquet metadata key of a committed file's record: input file and version, its rows, counts.
COMMIT_KEY = b"mtcls_commit"


def id_type_ok(t: pa.DataType) -> bool:
    """Whether a column of this type can identify rows: integers, strings and binary (dictionary-encoded too)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or pa.types.is_string_view(t)
            or pa.types.is_binary_view(t))


_NULL_HASH = np.uint64(0x9E3779B97F4A7C15)  # what a null id adds (any fixed value that no id hashes to in practice)


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bit hash per id, equal for equal ids whatever their integer width or string/binary type.

    Returns:
        ``(hashes, null)``: (N,) uint64 (a fixed value where the id is null) and (N,) bool.

    Raises:
        TypeError: For a type :func:`id_type_ok` refuses.
    """
    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not id_type_ok(arr.type):
        raise TypeError(f"ids of type {arr.type} cannot identify rows")
    null = arr.is_null().to_numpy(zero_copy_only=False).astype(bool)
    if pa.types.is_integer(arr.type):
        wide = pa.uint64() if pa.types.is_unsigned_integer(arr.type) else pa.int64()
        values = arr.cast(wide).fill_null(0).to_numpy(zero_copy_only=False).view(np.uint64)
        hashed = pd.util.hash_array(values)
    else:  # strings and binary hash alike by their bytes
        values = arr.cast(pa.large_binary()).fill_null(b"").to_numpy(zero_copy_only=False)
        hashed = pd.util.hash_array(np.asarray(values, dtype=object))
    hashed = np.asarray(hashed, dtype=np.uint64)
    hashed[null] = _NULL_HASH
    return hashed, null


def ids_checksum(ids: pa.Array | pa.ChunkedArray) -> int:
    """Order-independent checksum of ids: the wrapping sum of a 64-bit hash of each id (nulls included).

    Equal multisets of ids give equal sums; a missing, extra or duplicated id changes it (up to
    hash collisions, 2^-64).
    """
    return int(id_hashes(ids)[0].sum(dtype=np.uint64))


@dataclass(frozen=True)
class IdCount:
    """The ids of one file: rows, checksum, nulls, and ids that repeat an earlier id of the file."""

    rows: int
    checksum: int
    nulls: int = 0
    duplicates: int = 0


def checksum_file(fs: Any, path: str, column: str) -> IdCount:
    """Rows and id checksum (with null and duplicate counts) of one Parquet file, read back from storage."""
    with fs.open(path, "rb") as fh:
        ids = pq.read_table(fh, columns=[column]).column(column)
    hashed, null = id_hashes(ids)
    present = hashed[~null]
    duplicates = len(present) - len(np.unique(present))
    return IdCount(len(ids), int(hashed.sum(dtype=np.uint64)), int(null.sum()), int(duplicates))


def row_ranges(rows: np.ndarray) -> list[list[int]]:
    """Sorted unique row numbers -> ``[start, end)`` runs."""
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    return [[int(rows[s]), int(rows[e - 1]) + 1] for s, e in zip(starts, ends)]


def output_name(input_uri: str, fingerprint: str, ranges: list[list[int]]) -> str:
    """The output file's name: a function of the input file (and its version) and the exact rows it holds.

    A retried write of the same rows replaces the file instead of adding a second copy, whatever
    the work units of the run were.
    """
    source = hashlib.sha1(json.dumps([input_uri, fingerprint]).encode()).hexdigest()[:12]
    rows = hashlib.sha1(json.dumps(ranges).encode()).hexdigest()[:12]
    return f"part-{source}-{ranges[0][0]:010d}-{rows}.parquet"
