"""The write stage: scored blocks in, committed Parquet files out (a Ray Data ``map_batches`` function).

Rows are grouped by unit (:func:`unit_parts`, which the Delta Lake stage shares); each group is
written to staging and moved into place under a name derived from its input file and the exact
rows it holds (:func:`pipelines.sink.records.output_name`),
so a retried task replaces its file instead of adding a second copy. Right before the move the
task checks the job's fencing token (:class:`pipelines.sink.lock.Fence`): a job that lost its lease
moves nothing into place. A task stopped while it writes may leave a file in staging (``_mtcls/staging/``, which readers skip like
every ``_``-prefixed path); the next run clears it.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtcls import HeadSpec
from mtcls.profile import Profile, profile
from pipelines.blocks import PRECISION, PRECISION_TYPE, ROW, UNIT, distinct_precisions
from pipelines.sink.records import COMMIT_KEY, ids_checksum, output_name, row_ranges
from pipelines.sink.schema import ERROR_COLUMN, TRUNCATED_COLUMN

#: One row per file a write task committed.
WRITTEN_SCHEMA = pa.schema([("file", pa.string()), ("rows", pa.int64()), ("errors", pa.int64()),
                            ("truncated", pa.int64()), ("precision", pa.list_(PRECISION_TYPE))])


@dataclass
class UnitPart:
    """The rows of one unit found in a block, ready to write as one file.

    Attributes:
        name: The file's name (:func:`pipelines.sink.records.output_name`: input file, version, rows).
        commit: Its commit record: input URI, fingerprint, ``ranges``, rows, id checksum, error and
            truncated counts, precision used, and the profile when asked for.
        table: Its rows in the output schema, the commit record in the metadata (key ``mtcls_commit``).
    """

    name: str
    commit: dict[str, Any]
    table: pa.Table


def unit_parts(batch: pa.Table, units: list[dict[str, Any]], schema: pa.Schema, input_uris: list[str],
               fingerprints: list[str], profile_heads: Optional[list[dict]] = None) -> Iterator[UnitPart]:
    """Splits a scored block by unit, each part sorted by row, with its commit record.

    Args:
        batch: Scored rows: the output columns plus ``__unit``, ``__row`` and ``__precision``.
        units: Every unit of the run (:meth:`pipelines.sink.units.Unit.to_dict`, with ``file``: the
            index of its input file).
        schema: The output schema (columns are cast to its types; its first column is the id).
        input_uris: The input files' URIs (as recorded), by file index.
        fingerprints: The input files' versions, by file index.
        profile_heads: The heads whose prediction profile each record carries (head spec dicts).

    Raises:
        RuntimeError: A row reached the writer twice in one block.
    """
    unit_col = batch.column(UNIT).to_numpy()
    specs = [HeadSpec.from_dict(h) for h in profile_heads or []]
    for index in np.unique(unit_col):
        part = batch.filter(pa.array(unit_col == index))
        order = np.argsort(part.column(ROW).to_numpy(), kind="stable")
        part = part.take(pa.array(order))
        rows = part.column(ROW).to_numpy()
        if len(np.unique(rows)) != len(rows):
            raise RuntimeError(f"unit {units[index]['key']}: a row reached the writer twice in one block")
        unit = units[int(index)]
        ranges = row_ranges(rows)
        uri, fp = input_uris[unit["file"]], fingerprints[unit["file"]]
        table = pa.Table.from_arrays([part.column(f.name).cast(f.type) for f in schema], schema=schema)
        commit = file_record(table, uri, fp, ranges, distinct_precisions(part.column(PRECISION)), specs)
        table = table.replace_schema_metadata({**(schema.metadata or {}), COMMIT_KEY: json.dumps(commit).encode()})
        yield UnitPart(output_name(uri, fp, ranges), commit, table)


def file_record(table: pa.Table, uri: str, fingerprint: str, ranges: list[list[int]], precision: list[dict],
                specs: list[HeadSpec]) -> dict[str, Any]:
    """The commit record of a file holding ``table`` (output columns, id first): rows ``ranges`` of input
    file ``uri`` at version ``fingerprint``, the id checksum, error and truncated counts, the precision
    used, and, given ``specs``, the prediction profile."""
    commit = {
        "input": uri, "fingerprint": fingerprint, "ranges": ranges, "rows": int(table.num_rows),
        "checksum": str(ids_checksum(table.column(0))),
        "errors": int(table.num_rows - table.column(ERROR_COLUMN).null_count),
        "truncated": int(pc.sum(table.column(TRUNCATED_COLUMN)).as_py() or 0),
        "precision": precision,
    }
    if specs:
        commit["profile"] = file_profile(table, specs)
    return commit


def written_record(part: UnitPart, name: Optional[str] = None) -> dict[str, Any]:
    """A :data:`WRITTEN_SCHEMA` row for a file written from ``part`` (named ``name``, default its own)."""
    return {"file": name or part.name, **{k: part.commit[k] for k in ("rows", "errors", "truncated", "precision")}}


def write_units(batch: pa.Table, units: list[dict[str, Any]], schema: pa.Schema, out_fs: Any, out_root: str,
                staging: str, input_uris: list[str], fingerprints: list[str], fence: Any = None,
                profile_heads: Optional[list[dict]] = None) -> pa.Table:
    """Writes and commits one file per unit of the block.

    The file's metadata records the input file, its rows, the checksum of the ids written and,
    given ``profile_heads`` (head spec dicts), the prediction profile of its scored rows
    (:mod:`mtcls.profile`).

    Args:
        batch: Scored rows: the output columns plus ``__unit``, ``__row`` and ``__precision``.
        units: Every unit of the run (:meth:`pipelines.sink.units.Unit.to_dict`, with ``file``: the
            index of its input file).
        schema: The output schema.
        out_fs: The output filesystem.
        out_root: The output directory.
        staging: Where files are written before they move into place.
        input_uris: The input files' URIs (as recorded), by file index.
        fingerprints: The input files' versions, by file index.
        fence: Checked right before each file moves into place (:class:`pipelines.sink.lock.Fence`);
            None: no lease.
        profile_heads: The heads whose prediction profile each file records.

    Returns:
        One row per file written (:data:`WRITTEN_SCHEMA`).

    Raises:
        LockLostError: The job lost its lease; the file is not committed.
    """
    records = []
    for part in unit_parts(batch, units, schema, input_uris, fingerprints, profile_heads):
        tmp = posixpath.join(staging, f"{part.name}.{uuid.uuid4().hex[:8]}")
        out_fs.makedirs(staging, exist_ok=True)
        with out_fs.open(tmp, "wb") as fh:
            pq.write_table(part.table, fh, compression="zstd")
        try:
            if fence is not None:
                fence.check()
        except Exception:
            out_fs.rm(tmp)
            raise
        out_fs.mv(tmp, posixpath.join(out_root, part.name))
        records.append(written_record(part))
    return pa.Table.from_pylist(records, schema=WRITTEN_SCHEMA)


def file_profile(table: pa.Table, specs: list[HeadSpec]) -> Profile:
    """The prediction profile of an output table's scored rows (those without an ``error``)."""
    scored = table.filter(table.column(ERROR_COLUMN).is_null())
    return profile(specs, {s.name: s.impl.probabilities_from_columns(s, scored) for s in specs})
