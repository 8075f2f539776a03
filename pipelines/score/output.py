"""The scoring output directory: committed files, what they cover, and the check before ``_SUCCESS``.

Layout (everything a reader skips starts with ``_``)::

    <output>/part-<unit>-<rows>.parquet   predictions, committed one file at a time while the job runs
    <output>/_manifest.json               the last run: config, model, row counts, timings, verification
    <output>/_SUCCESS                     written last, only when every input row is in the output once
    <output>/_mtcls/lock*.json            the live job's lease (one writer per output)
    <output>/_mtcls/staging/              files being written; moved into place when complete

Every output file's Parquet metadata (key ``mtcls_commit``) says which unit of which input file it
holds, which rows of it (``ranges``), and the checksum of its ids. A rerun reads these footers to
skip rows already scored; the final check reads the ids back from disk.
"""

from __future__ import annotations

import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow.parquet as pq

from pipelines.score.stages import COMMIT_KEY, ids_checksum
from pipelines.score.units import Unit
from pipelines.storage import InputError, Location

log = logging.getLogger(__name__)

LOCK_PREFIX = "lock"  # the lease files of pipelines.score.lock


@dataclass
class Committed:
    """One committed output file and what its footer says."""

    name: str
    rows: int
    commit: dict[str, Any]

    @property
    def ranges(self) -> list[list[int]]:
        return self.commit["ranges"]


@dataclass
class Verification:
    """The result of :meth:`OutputDir.verify`."""

    files: list[Committed] = field(default_factory=list)
    rows_out: int = 0
    rows_error: int = 0
    rows_truncated: int = 0
    duplicates_removed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class OutputDir:
    """The output directory of a scoring job."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc
        self.internal = loc.join("_mtcls")
        self.staging = self.internal.join("staging")

    def check_owner(self) -> None:
        """Refuses a non-empty directory that mtcls did not write (nothing of the user's is touched).

        Runs before the lock is taken (the lock creates ``_mtcls/``).
        """
        fs = self.loc.fs
        if fs.exists(self.loc.path) and fs.ls(self.loc.path) and not fs.exists(self.internal.path):
            raise InputError(
                f"output directory {self.loc.uri()!r} is not empty and was not written by mtcls; "
                "choose another output or set overwrite=true"
            )

    def prepare(self, overwrite: bool) -> None:
        """Empties the directory on ``overwrite`` (keeping the lock), and clears leftover staging."""
        fs = self.loc.fs
        if overwrite and fs.exists(self.loc.path):
            for path in fs.ls(self.loc.path, detail=False):
                if posixpath.basename(path) != "_mtcls":
                    fs.rm(path, recursive=True)
            for path in fs.ls(self.internal.path, detail=False) if fs.exists(self.internal.path) else []:
                if not posixpath.basename(path).startswith(LOCK_PREFIX):
                    fs.rm(path, recursive=True)
        if fs.exists(self.staging.path):
            fs.rm(self.staging.path, recursive=True)  # a killed job's half-written files
        fs.makedirs(self.staging.path, exist_ok=True)

    def committed(self, threads: int = 16) -> list[Committed]:
        """Every committed output file with its commit metadata (footers read in parallel)."""
        fs = self.loc.fs
        if not fs.exists(self.loc.path):
            return []
        names = sorted(posixpath.basename(p) for p in fs.ls(self.loc.path, detail=False)
                       if posixpath.basename(p).startswith("part-") and p.endswith(".parquet"))

        def read(name: str) -> Committed:
            with fs.open(self.loc.join(name).path, "rb") as fh:
                pf = pq.ParquetFile(fh)
                meta = (pf.schema_arrow.metadata or {}).get(COMMIT_KEY)
                if meta is None:
                    raise InputError(f"output file {self.loc.uri(self.loc.join(name).path)!r} has no commit record; "
                                     "it was not written by this version of mtcls: rerun with overwrite=true")
                return Committed(name, pf.metadata.num_rows, json.loads(meta))

        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(names) or 1))) as pool:
            return list(pool.map(read, names))

    def remove(self, names: list[str]) -> None:
        for name in names:
            self.loc.fs.rm(self.loc.join(name).path)

    def resume(self, units: list[Unit]) -> tuple[list[Committed], list[str]]:
        """Marks the rows of each unit already in the output; removes files of units no longer planned.

        A file whose unit is not in the plan belongs to an input file that changed or disappeared
        since it was written: its rows are stale and it is deleted (the changed file is rescored).

        Returns:
            The committed files kept, and the names of the stale files removed.
        """
        by_key = {u.key: u for u in units}
        files = self.committed()
        stale = [f.name for f in files if f.commit["unit"] not in by_key]
        if stale:
            log.warning("%d output files belong to input files that changed or were removed since they were scored; "
                        "removing them (their inputs are rescored)", len(stale))
            self.remove(stale)
        kept = [f for f in files if f.commit["unit"] in by_key]
        for f in kept:
            by_key[f.commit["unit"]].done.extend(f.ranges)
        for u in units:
            u.done = _merge(u.done)
        return kept, stale

    def verify(self, units: list[Unit], id_column: str, checksum_files: Any) -> Verification:
        """Proves every input row is in the output exactly once, from what is on disk.

        Per unit, the committed files must cover its rows exactly; files that repeat rows already
        covered (a retried task that cut its rows differently) are removed. Then the ids of every
        kept file are read back and their checksums summed per unit must equal the checksum of
        the unit's ids read from the input.

        Args:
            units: The plan.
            id_column: The id column.
            checksum_files: ``f(names) -> {name: (rows, checksum)}`` reading ids from disk
                (a Ray fan-out in the job, a loop in tests).
        """
        result = Verification()
        by_unit: dict[str, list[Committed]] = {}
        for f in self.committed():
            by_unit.setdefault(f.commit["unit"], []).append(f)
        keep: list[Committed] = []
        for u in units:
            chosen, extra, problem = _exact_cover(u, by_unit.get(u.key, []))
            if problem:
                result.problems.append(problem)
            result.duplicates_removed += [f.name for f in extra]
            keep += chosen
        if result.duplicates_removed:
            log.warning("removing %d output files whose rows another file already holds", len(result.duplicates_removed))
            self.remove(result.duplicates_removed)
        disk = checksum_files([f.name for f in keep])
        sums: dict[str, int] = {}
        for f in keep:
            rows, checksum = disk[f.name]
            if rows != f.commit["rows"]:
                result.problems.append(f"{f.name}: footer says {f.commit['rows']} rows, {rows} read back")
            sums[f.commit["unit"]] = (sums.get(f.commit["unit"], 0) + checksum) % 2**64
        for u in units:
            expected = {int(f.commit["unit_checksum"]) for f in by_unit.get(u.key, [])}
            if len(expected) == 1 and sums.get(u.key) != expected.pop():
                result.problems.append(f"unit {u.key} of {u.path}: the ids in the output differ from the ids in the input")
        result.files = keep
        result.rows_out = sum(f.rows for f in keep)
        result.rows_error = sum(f.commit["errors"] for f in keep)
        result.rows_truncated = sum(f.commit["truncated"] for f in keep)
        return result


def _merge(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _exact_cover(unit: Unit, files: list[Committed]) -> tuple[list[Committed], list[Committed], Optional[str]]:
    """Files that hold each of the unit's rows once, the redundant rest, and a problem if rows are missing."""
    taken: list[list[int]] = []
    chosen, extra = [], []
    for f in sorted(files, key=lambda f: (f.ranges[0][0] if f.ranges else 0, f.name)):
        if any(a < d and c < b for a, b in f.ranges for c, d in taken):
            if all(any(c <= a and b <= d for c, d in _merge(taken)) for a, b in f.ranges):
                extra.append(f)
                continue
            return chosen, extra, f"unit {unit.key}: output file {f.name} overlaps others in part; rerun with overwrite=true"
        chosen.append(f)
        taken.extend(f.ranges)
    merged = _merge(taken)
    expected = [[unit.first_row, unit.first_row + unit.rows]]
    if merged != expected:
        missing = unit.rows - sum(b - a for a, b in merged)
        return chosen, extra, f"unit {unit.key} of {unit.path}: {missing} of its {unit.rows} rows are not in the output"
    return chosen, extra, None


def checksum_file(fs: Any, path: str, id_column: str) -> tuple[int, int]:
    """Rows and id checksum of one output file, read back from storage."""
    with fs.open(path, "rb") as fh:
        ids = pq.read_table(fh, columns=[id_column]).column(id_column)
    return len(ids), ids_checksum(ids)
