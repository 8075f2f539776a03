"""What every committed output file records, and the checksums that prove exactly-once.

Light on purpose (numpy, pandas, pyarrow only): the verification tasks import it on any worker.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

#: Parquet metadata key of a committed file's record: input file and version, its rows, counts.
COMMIT_KEY = b"mtcls_commit"


def ids_checksum(ids: pa.Array | pa.ChunkedArray) -> int:
    """Order-independent checksum of ids: the wrapping sum of a 64-bit hash of each id.

    Equal multisets of ids give equal sums; a missing, extra or duplicated id changes it (up to
    hash collisions, 2^-64).
    """
    values = ids.to_numpy(zero_copy_only=False) if len(ids) else np.zeros(0, dtype=object)
    hashed = pd.util.hash_array(np.asarray(values, dtype=object))
    return int(hashed.sum(dtype=np.uint64))


def checksum_file(fs: Any, path: str, column: str) -> tuple[int, int]:
    """Rows and id checksum of one Parquet file, read back from storage."""
    with fs.open(path, "rb") as fh:
        ids = pq.read_table(fh, columns=[column]).column(column)
    return len(ids), ids_checksum(ids)


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
