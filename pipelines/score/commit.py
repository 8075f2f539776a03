"""The commit protocol of the scoring output: waves staged, checked, recorded, moved into place."""

from __future__ import annotations

import logging
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from pipelines.score.schema import ERROR_COLUMN, TRUNCATED_COLUMN
from pipelines.storage import InputError, Location, read_json, write_json

log = logging.getLogger(__name__)


@dataclass
class Wave:
    """One commit unit: some input files, their row count, and a unique name."""

    name: str
    files: list[str]
    rows: int


def plan_waves(pending: dict[str, int], wave_rows: int) -> list[Wave]:
    """Groups pending input files (path -> rows) into waves of about ``wave_rows`` rows."""
    waves: list[Wave] = []
    current: list[str] = []
    rows = 0
    for path, n in pending.items():
        if current and rows + n > wave_rows:
            waves.append(Wave(uuid.uuid4().hex[:12], current, rows))
            current, rows = [], 0
        current.append(path)
        rows += n
    if current:
        waves.append(Wave(uuid.uuid4().hex[:12], current, rows))
    return waves


class OutputDir:
    """The output directory and its commit records."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc
        self.records = loc.join("_mtcls", "waves")
        self.staging = loc.join("_mtcls", "staging")

    def prepare(self, overwrite: bool) -> None:
        fs = self.loc.fs
        if overwrite and fs.exists(self.loc.path):
            fs.rm(self.loc.path, recursive=True)
        if fs.exists(self.loc.path) and fs.ls(self.loc.path) and not fs.exists(self.loc.join("_mtcls").path):
            raise InputError(
                f"output directory {self.loc.uri()!r} is not empty and was not written by mtcls; "
                "choose another output or set overwrite=true"
            )
        fs.makedirs(self.records.path, exist_ok=True)

    def wave_records(self) -> list[dict[str, Any]]:
        fs = self.loc.fs
        if not fs.exists(self.records.path):
            return []
        paths = sorted(p for p in fs.ls(self.records.path, detail=False) if p.endswith(".json"))
        return [read_json(Location(fs, p, self.loc.protocol)) for p in paths]

    def recover(self) -> list[dict[str, Any]]:
        """Finishes interrupted commits and drops unrecorded staging; returns committed records."""
        fs = self.loc.fs
        records = self.wave_records()
        for rec in records:
            if rec["state"] == "committing":
                self._move(rec)
        known = {rec["wave"] for rec in records}
        if fs.exists(self.staging.path):
            for path in fs.ls(self.staging.path, detail=False):
                if posixpath.basename(path) not in known:
                    log.info("discarding unfinished wave %s", path)
                    fs.rm(path, recursive=True)
        return records

    def commit(self, wave: Wave, staged: list[str], counts: dict[str, int]) -> dict[str, Any]:
        record = {
            "wave": wave.name,
            "state": "committing",
            "inputs": wave.files,
            "rows": wave.rows,
            "files": [f"part-{wave.name}-{i:05d}.parquet" for i in range(len(staged))],
            "staged": [posixpath.basename(p) for p in staged],
            **counts,
        }
        write_json(self.records.join(f"{wave.name}.json"), record)
        self._move(record)
        return record

    def _move(self, record: dict[str, Any]) -> None:
        fs = self.loc.fs
        stage = self.staging.join(record["wave"])
        for staged_name, name in zip(record["staged"], record["files"]):
            src = stage.join(staged_name).path
            dst = self.loc.join(name).path
            if fs.exists(src):
                fs.mv(src, dst)
            elif not fs.exists(dst):
                raise RuntimeError(f"commit record {record['wave']} lists {name} but it is neither staged nor in place")
        if fs.exists(stage.path):
            fs.rm(stage.path, recursive=True)
        record["state"] = "done"
        write_json(self.records.join(f"{record['wave']}.json"), record)


def count_output(loc: Location, files: list[str]) -> dict[str, int]:
    """Rows, error rows and truncated rows in written files (reads two small columns)."""
    rows = errors = truncated = 0
    for path in files:
        with loc.fs.open(path, "rb") as fh:
            table = pq.read_table(fh, columns=[ERROR_COLUMN, TRUNCATED_COLUMN])
        rows += table.num_rows
        errors += table.num_rows - table.column(ERROR_COLUMN).null_count
        truncated += sum(1 for v in table.column(TRUNCATED_COLUMN).to_pylist() if v)
    return {"rows_out": rows, "rows_error": errors, "rows_truncated": truncated}


