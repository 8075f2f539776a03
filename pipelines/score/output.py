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

import hashlib
import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from mtcls.profile import Profile, merge_profiles
from pipelines.score.records import COMMIT_KEY
from pipelines.score.schema import METADATA_KEY
from pipelines.score.units import InputFile, Unit
from pipelines.storage import InputError, Location

log = logging.getLogger(__name__)

LOCK_PREFIX = "lock"  # the lease files of pipelines.score.lock


@dataclass
class Committed:
    """One committed output file and what its footer says."""

    name: str
    rows: int
    commit: dict[str, Any]
    #: What the file's rows mean: its columns and the model that scored them (:func:`output_layout`).
    layout: dict[str, str] = field(default_factory=dict)

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
    #: The merged prediction profile of the files that carry one (:mod:`mtcls.profile`).
    profile: Profile = field(default_factory=dict)
    #: Rows of files committed without a profile (profiles off, or an older mtcls).
    rows_unprofiled: int = 0


class OutputDir:
    """The output directory of a scoring job."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc
        self.internal = loc.join("_mtcls")
        self.staging = self.internal.join("staging")

    def check_owner(self, overwrite: bool) -> None:
        """Refuses a non-empty directory that mtcls did not write (nothing of the user's is touched).

        Runs before the lock is taken (the lock creates ``_mtcls/``).
        """
        fs = self.loc.fs
        if overwrite:
            return
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
        fs.invalidate_cache(self.loc.path)  # other processes wrote here; object stores cache listings
        if not fs.exists(self.loc.path):
            return []
        names = sorted(posixpath.basename(p) for p in fs.ls(self.loc.path, detail=False)
                       if posixpath.basename(p).startswith("part-") and p.endswith(".parquet"))

        def read(name: str) -> Committed:
            path = self.loc.join(name).path
            try:
                with fs.open(path, "rb") as fh:
                    pf = pq.ParquetFile(fh)
                    meta, rows = (pf.schema_arrow.metadata or {}).get(COMMIT_KEY), pf.metadata.num_rows
                    layout = output_layout(pf.schema_arrow)
            except Exception as exc:  # pyarrow raises several types for a bad footer
                raise InputError(f"output file {self.loc.uri(path)!r} is unreadable ({type(exc).__name__}: {exc}); "
                                 "delete it and rerun, or rerun with overwrite=true") from exc
            if meta is None:
                raise InputError(f"output file {self.loc.uri(path)!r} has no commit record; "
                                 "it was not written by this version of mtcls: rerun with overwrite=true")
            return Committed(name, rows, json.loads(meta), layout)

        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(names) or 1))) as pool:
            return list(pool.map(read, names))

    def remove(self, names: list[str]) -> None:
        for name in names:
            self.loc.fs.rm(self.loc.join(name).path)

    def resume(self, units: list[Unit], inputs: dict[str, InputFile]) -> tuple[list[Committed], list[str]]:
        """Marks the rows of each unit already in the output; removes files of inputs that changed.

        A committed file belongs to an input file and version (URI and fingerprint). A file of an
        input that changed or disappeared since it was written holds stale rows: it is deleted
        (and the changed input is scored again).

        Args:
            units: The plan; their ``done`` ranges are filled in.
            inputs: The current input files by path.

        Returns:
            The committed files kept, and the names of the stale files removed.
        """
        current = {(f.uri, f.fingerprint): path for path, f in inputs.items()}
        files = self.committed()
        stale = [f.name for f in files if (f.commit["input"], f.commit["fingerprint"]) not in current]
        if stale:
            log.warning("%d output files belong to input files that changed or were removed since they were scored; "
                        "removing them (their inputs are rescored)", len(stale))
            self.remove(stale)
        kept = [f for f in files if (f.commit["input"], f.commit["fingerprint"]) in current]
        done: dict[str, list[list[int]]] = {}
        for f in kept:
            done.setdefault(current[(f.commit["input"], f.commit["fingerprint"])], []).extend(f.ranges)
        for u in units:
            end = u.first_row + u.rows
            u.done = [[max(a, u.first_row), min(b, end)] for a, b in _merge(done.get(u.path, [])) if a < end and b > u.first_row]
        return kept, stale

    def verify(self, inputs: dict[str, InputFile], checksums: Any) -> Verification:
        """Proves every input row is in the output exactly once, from what is on disk.

        Per input file, the committed files must hold each of its rows once; a file that repeats
        rows others already hold (a retried task that cut its rows differently) is removed. Then
        the ids of every kept file are read back from storage, and their checksums summed per
        input file must equal the checksum of that input file's ids, read from the input.

        Args:
            inputs: The input files by path.
            checksums: ``f([(filesystem, path)]) -> [(rows, checksum)]`` reading ids from storage
                (a Ray fan-out in the job).
        """
        result = Verification()
        by_input: dict[tuple[str, str], list[Committed]] = {}
        for f in self.committed():
            by_input.setdefault((f.commit["input"], f.commit["fingerprint"]), []).append(f)
        for inp in inputs.values():
            chosen, extra, problem = _exact_cover(inp, by_input.get((inp.uri, inp.fingerprint), []))
            if problem:
                result.problems.append(problem)
            result.duplicates_removed += [f.name for f in extra]
            result.files += chosen
        if result.duplicates_removed:
            log.warning("removing %d output files whose rows another file already holds", len(result.duplicates_removed))
            self.remove(result.duplicates_removed)
        paths = [(self.loc.fs, self.loc.join(f.name).path) for f in result.files]
        paths += [(inp.fs, path) for path, inp in inputs.items()]
        read_back = checksums(paths)
        sums: dict[tuple[str, str], int] = {}
        for f, (rows, checksum) in zip(result.files, read_back):
            if rows != f.commit["rows"]:
                result.problems.append(f"{f.name}: its footer says {f.commit['rows']} rows, {rows} were read back")
            key = (f.commit["input"], f.commit["fingerprint"])
            sums[key] = (sums.get(key, 0) + checksum) % 2**64
        for inp, (_, checksum) in zip(inputs.values(), read_back[len(result.files):]):
            if not any(p.startswith(f"{inp.uri}:") for p in result.problems) and sums.get((inp.uri, inp.fingerprint), 0) != checksum:
                result.problems.append(f"{inp.uri}: the ids in the output differ from the ids in the input")
        result.rows_out = sum(f.rows for f in result.files)
        result.rows_error = sum(f.commit["errors"] for f in result.files)
        result.rows_truncated = sum(f.commit["truncated"] for f in result.files)
        result.profile = merge_profiles([f.commit["profile"] for f in result.files if "profile" in f.commit])
        result.rows_unprofiled = sum(f.rows for f in result.files if "profile" not in f.commit)
        return result


def output_layout(schema: pa.Schema) -> dict[str, str]:
    """What must match for files to share an output: the columns with their types, and the model
    (weights hash and head specs, thresholds and temperatures included)."""
    meta = json.loads((schema.metadata or {}).get(METADATA_KEY, b"{}"))
    columns = ", ".join(f"{f.name}: {f.type}" for f in schema)
    model = json.dumps([meta.get("model", {}).get("weights_sha256"), [h.get("spec") for h in meta.get("heads", [])]], sort_keys=True)
    return {"columns": columns, "model": hashlib.sha256(model.encode()).hexdigest()[:16]}


def check_layout(files: list[Committed], schema: pa.Schema, uri: str) -> None:
    """Refuses to resume into an output whose committed files were written with other columns or another model.

    Raises:
        InputError: Naming a file, what differs, and the way out (``overwrite=true``).
    """
    if not files:
        return
    buffer = pa.BufferOutputStream()  # compare with the schema as Parquet gives it back (types can change on the way)
    pq.write_table(schema.empty_table(), buffer)
    expected = output_layout(pq.read_schema(pa.BufferReader(buffer.getvalue())))
    for f in files:
        differs = [k for k in ("columns", "model") if f.layout.get(k) != expected[k]]
        if differs:
            what = (f"other columns than this run writes (file: [{f.layout.get('columns')}]; this run: [{expected['columns']}])"
                    if "columns" in differs else "another model (weights, heads, thresholds or temperatures) than this run uses")
            raise InputError(f"output {uri!r} holds files written with {what}, e.g. {f.name}; "
                             "rerun with overwrite=true, or choose another output")


def _merge(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _exact_cover(inp: InputFile, files: list[Committed]) -> tuple[list[Committed], list[Committed], Optional[str]]:
    """Files that hold each row of an input file once, the redundant rest, and a problem if rows are missing."""
    taken: list[list[int]] = []
    chosen, extra = [], []
    for f in sorted(files, key=lambda f: (f.ranges[0][0] if f.ranges else 0, f.name)):
        if any(a < d and c < b for a, b in f.ranges for c, d in taken):
            merged = _merge(taken)
            if all(any(c <= a and b <= d for c, d in merged) for a, b in f.ranges):
                extra.append(f)
                continue
            return chosen, extra, f"{inp.uri}: output file {f.name} holds rows that other files hold too; rerun with overwrite=true"
        chosen.append(f)
        taken.extend(f.ranges)
    covered = sum(b - a for a, b in _merge(taken))
    if covered != inp.rows:
        return chosen, extra, f"{inp.uri}: {inp.rows - covered} of its {inp.rows} rows are not in the output"
    return chosen, extra, None


def visible_rows(loc: Location) -> int:
    """Rows a reader of the output directory sees now (footers of the committed files; for monitoring)."""
    total = 0
    loc.fs.invalidate_cache(loc.path)
    for path in loc.fs.glob(posixpath.join(loc.path, "part-*.parquet")):
        try:
            with loc.fs.open(path, "rb") as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        except (OSError, ValueError, FileNotFoundError):  # a file being replaced by a retried write
            continue
    return total
