"""Work units: the input cut into pieces of about ``rows_per_file`` rows, known before any work starts.

A unit is a run of consecutive row groups of one input file. Its key is a hash of the input file's
URI, fingerprint (size and modification time or ETag) and row range, so it names the same rows on
every run, and changes when the input file changes. Each unit becomes one output file or a few
(if a kill interrupted it, the rest is scored by the rerun); the output files record which rows of
which unit they hold.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq

from pipelines.storage import InputError, Location


@dataclass
class Unit:
    """One work unit.

    Attributes:
        key: Stable name (hash of input URI, fingerprint, first row and rows).
        path: Input file path (on the input filesystem).
        row_groups: Row groups of the file it covers.
        first_row: Row number in the file of its first row.
        rows: Rows it covers.
        done: ``[start, end)`` row ranges (file row numbers) already in the output.
    """

    key: str
    path: str
    row_groups: list[int]
    first_row: int
    rows: int
    done: list[list[int]] = field(default_factory=list)

    @property
    def pending_rows(self) -> int:
        return self.rows - sum(b - a for a, b in self.done)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InputFile:
    """One input file as planned: where it is, its version and its rows."""

    fs: Any
    uri: str
    fingerprint: str
    rows: int


def fingerprint(loc: Location, path: str) -> str:
    """Size and modification time (or ETag) of a file: changes when the file is rewritten.

    A file rewritten with the same size within the filesystem's timestamp resolution keeps its
    fingerprint; on object stores the ETag changes with the content.
    """
    info = loc.fs.info(path)
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("created")
    return f"{info.get('size')}:{stamp}"


def _file_units(loc: Location, path: str, rows_per_unit: int) -> tuple[list[Unit], InputFile]:
    try:
        with loc.fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
    except Exception as exc:  # pyarrow raises several types for a bad footer
        raise InputError(f"cannot read Parquet file {loc.uri(path)!r}: {type(exc).__name__}: {exc}") from exc
    uri, fp = loc.uri(path), fingerprint(loc, path)
    units: list[Unit] = []
    groups: list[int] = []
    first = start = 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if groups and start - first + n > rows_per_unit:
            units.append(_unit(uri, fp, path, groups, first, start - first))
            groups, first = [], start
        groups.append(g)
        start += n
    if groups and start > first:
        units.append(_unit(uri, fp, path, groups, first, start - first))
    return units, InputFile(loc.fs, uri, fp, meta.num_rows)


def _unit(uri: str, fp: str, path: str, groups: list[int], first: int, rows: int) -> Unit:
    key = hashlib.sha1(json.dumps([uri, fp, first, rows]).encode()).hexdigest()[:16]
    return Unit(key=key, path=path, row_groups=list(groups), first_row=first, rows=rows)


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
