"""The write stage: scored blocks in, committed Parquet files out (a Ray Data ``map_batches`` function).

Rows are grouped by unit; each group is written to staging and moved into place under a name
derived from its input file and the exact rows it holds (:func:`pipelines.sink.records.output_name`),
so a retried task replaces its file instead of adding a second copy. Right before the move the
task checks the job's fencing token (:class:`pipelines.sink.lock.Fence`): a job that lost its lease
moves nothing into place.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any, Optional

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
    unit_col = batch.column(UNIT).to_numpy()
    specs = [HeadSpec.from_dict(h) for h in profile_heads or []]
    records = []
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
        name = output_name(uri, fp, ranges)
        precisions = distinct_precisions(part.column(PRECISION))
        commit = {
            "input": uri, "fingerprint": fp, "ranges": ranges, "rows": int(part.num_rows),
            "checksum": str(ids_checksum(part.column(schema.names[0]))),
            "errors": int(part.num_rows - part.column(ERROR_COLUMN).null_count),
            "truncated": int(pc.sum(part.column(TRUNCATED_COLUMN)).as_py() or 0),
            "precision": precisions,
        }
        table = pa.Table.from_arrays([part.column(f.name).cast(f.type) for f in schema], schema=schema)
        if specs:
            commit["profile"] = file_profile(table, specs)
        table = table.replace_schema_metadata({**(schema.metadata or {}), COMMIT_KEY: json.dumps(commit).encode()})
        tmp = posixpath.join(staging, f"{name}.{uuid.uuid4().hex[:8]}")
        out_fs.makedirs(staging, exist_ok=True)
        with out_fs.open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
        try:
            if fence is not None:
                fence.check()
        except Exception:
            out_fs.rm(tmp)
            raise
        out_fs.mv(tmp, posixpath.join(out_root, name))
        records.append({"file": name, **{k: commit[k] for k in ("rows", "errors", "truncated", "precision")}})
    return pa.Table.from_pylist(records, schema=WRITTEN_SCHEMA)


def file_profile(table: pa.Table, specs: list[HeadSpec]) -> Profile:
    """The prediction profile of an output table's scored rows (those without an ``error``)."""
    scored = table.filter(table.column(ERROR_COLUMN).is_null())
    return profile(specs, {s.name: s.impl.probabilities_from_columns(s, scored) for s in specs})
