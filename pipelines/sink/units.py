"""Work units: the input cut into pieces of at most ``rows_per_file`` rows, known before any work starts.

A unit is a range of consecutive rows of one input file (within its row groups: a row group of a
million rows becomes several units, read by row range). Its key is a hash of the input file's
URI, fingerprint and row range, so it names the same rows on every run and changes when the
input file changes. Each unit becomes one output file or a few (if a kill interrupted it, the
rest is scored by the rerun); the output files record which rows of which input file they hold.

An input file is known by its content, not by its spelling or its modification time: its URI is
the canonical one (:func:`pipelines.storage.locate` resolves symlinks, ``..`` and ``file://``), and
its fingerprint is a hash of its Parquet footer (row groups, column chunk offsets, sizes and
statistics) and size, plus the object's ETag or version id where the store gives one. A copy that
keeps the size and mtime (``cp -p``, ``rsync -t``) but not the content changes the fingerprint;
a ``touch`` does not. Cost: the one footer read that planning does anyway.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.storage import InputError, Location, redact_uri

FOOTER_TAIL = 8  # 4-byte footer length + "PAR1"


@dataclass
class Unit:
    """One work unit.

    Attributes:
        key: Stable name (hash of input URI, fingerprint, first row and rows).
        path: Input file path (on the input filesystem).
        row_groups: Row groups of the file that hold its rows.
        first_row: Row number in the file of its first row.
        rows: Rows it covers.
        group_first_row: Row number in the file of the first row of ``row_groups[0]``.
        done: ``[start, end)`` row ranges (file row numbers) already in the output.
    """

    key: str
    path: str
    row_groups: list[int]
    first_row: int
    rows: int
    group_first_row: int = 0
    done: list[list[int]] = field(default_factory=list)

    @property
    def pending_rows(self) -> int:
        return self.rows - sum(b - a for a, b in self.done)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InputFile:
    """One input file as planned: its filesystem, its URI (canonical, credentials removed), its version and its rows."""

    fs: Any
    uri: str
    fingerprint: str
    rows: int


def fingerprint(loc: Location, path: str, fh: Any) -> str:
    """The version of a Parquet file from its content: sha256 of its footer and size, with the ETag or version id.

    Args:
        loc: Where the file is.
        path: Its path.
        fh: The file, open for reading (seekable).
    """
    info = loc.fs.info(path)
    size = int(info.get("size") or 0)
    fh.seek(size - FOOTER_TAIL)
    tail = fh.read(FOOTER_TAIL)
    if len(tail) != FOOTER_TAIL or tail[4:] != b"PAR1":
        raise InputError(f"cannot read Parquet file {redact_uri(loc.uri(path))!r}: it does not end with a Parquet footer")
    length = int.from_bytes(tail[:4], "little")
    fh.seek(size - FOOTER_TAIL - length)
    digest = hashlib.sha256(fh.read(length) + tail + str(size).encode())
    for key in ("VersionId", "version_id", "ETag", "etag", "generation"):
        if info.get(key):
            digest.update(f"{key}={info[key]}".encode())
    fh.seek(0)
    return f"{size}:{digest.hexdigest()[:32]}"


def _file_units(loc: Location, path: str, rows_per_unit: int) -> tuple[list[Unit], InputFile]:
    uri = redact_uri(loc.uri(path))  # what every record and message names: no credentials
    try:
        with loc.fs.open(path, "rb") as fh:
            fp = fingerprint(loc, path, fh)
            meta = pq.ParquetFile(fh).metadata
    except InputError:
        raise
    except Exception as exc:  # pyarrow raises several types for a bad footer
        raise InputError(f"cannot read Parquet file {uri!r}: {type(exc).__name__}: {exc}") from exc
    units: list[Unit] = []
    groups: list[int] = []
    group_first = first = start = 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if groups and start - first + n > rows_per_unit:
            units.append(_unit(uri, fp, path, groups, first, start - first, group_first))
            groups, first, group_first = [], start, start
        if n > rows_per_unit:  # a large row group: whole units of rows_per_unit rows inside it, read by row range
            for lo in range(start, start + n - n % rows_per_unit, rows_per_unit):
                units.append(_unit(uri, fp, path, [g], lo, rows_per_unit, start))
            rest = n % rows_per_unit
            groups, first, group_first = ([g], start + n - rest, start) if rest else ([], start + n, start + n)
        else:
            groups.append(g)
        start += n
    if groups and start > first:
        units.append(_unit(uri, fp, path, groups, first, start - first, group_first))
    return units, InputFile(loc.fs, uri, fp, meta.num_rows)


def _unit(uri: str, fp: str, path: str, groups: list[int], first: int, rows: int, group_first: int) -> Unit:
    key = hashlib.sha1(json.dumps([uri, fp, first, rows]).encode()).hexdigest()[:16]
    return Unit(key=key, path=path, row_groups=list(groups), first_row=first, rows=rows, group_first_row=group_first)


def plan_units(loc: Location, files: list[str], rows_per_unit: int, threads: int = 16) -> tuple[list[Unit], dict[str, InputFile]]:
    """Units of every input file, from their footers (read in parallel).

    Returns:
        The units in file order, and each input file by path.

    Raises:
        InputError: Naming a file whose footer cannot be read.
    """
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        results = list(pool.map(lambda p: _file_units(loc, p, rows_per_unit), files))
    units = [u for file_units, _ in results for u in file_units]
    return units, {p: f for p, (_, f) in zip(files, results)}


def read_unit(unit: dict[str, Any], in_fs: Any, columns: list[str], optional: tuple[str, ...] = (),
              batch_rows: int = 65_536) -> tuple[pa.Table, Any]:
    """A unit's rows not yet in the output, and their row numbers in the file.

    Reads only the unit's row range: a large row group is streamed in batches and cut, so a
    task holds about the unit's rows, not the whole row group.

    Args:
        unit: The unit (:meth:`Unit.to_dict`).
        in_fs: The input filesystem.
        columns: Columns to read.
        optional: Further columns, read only where the file has them.
        batch_rows: Rows per decoded batch while streaming a row group.
    """
    import numpy as np

    lo, hi = unit["first_row"], unit["first_row"] + unit["rows"]
    with in_fs.open(unit["path"], "rb") as fh:
        pf = pq.ParquetFile(fh)
        extra = [c for c in optional if c in pf.schema_arrow.names and c not in columns]
        wanted = [*columns, *extra]
        group_rows = sum(pf.metadata.row_group(g).num_rows for g in unit["row_groups"])
        if unit.get("group_first_row", lo) == lo and group_rows == unit["rows"]:
            table = pf.read_row_groups(unit["row_groups"], columns=wanted)
        else:
            pieces, at = [], unit.get("group_first_row", lo)
            for batch in pf.iter_batches(batch_size=min(batch_rows, max(1, unit["rows"])), row_groups=unit["row_groups"], columns=wanted):
                a, b = max(lo, at), min(hi, at + batch.num_rows)
                if a < b:
                    pieces.append(batch.slice(a - at, b - a))
                at += batch.num_rows
                if at >= hi:
                    break
            table = pa.Table.from_batches(pieces, schema=pf.schema_arrow.empty_table().select(wanted).schema) if pieces else \
                pf.schema_arrow.empty_table().select(wanted)
    rows = np.arange(lo, lo + table.num_rows, dtype=np.int64)
    keep = np.ones(table.num_rows, dtype=bool)
    for a, b in unit["done"]:
        keep[a - lo:b - lo] = False
    if not keep.all():
        table, rows = table.filter(pa.array(keep)), rows[keep]
    return table, rows
