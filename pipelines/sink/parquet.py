"""The Parquet directory backend: committed files, what they cover, and the check before ``_SUCCESS``.

Layout (everything a reader skips starts with ``_``)::

    <output>/part-<input>-<row>-<rows>.parquet   predictions, committed one file at a time while the job runs
    <output>/_manifest.json                      the last run: config, model, row counts, timings, verification
    <output>/_SUCCESS                            only while the last verification passed
    <output>/_mtcls/lock*.json                   the live job's lease (one writer per output)
    <output>/_mtcls/staging/                     files being written; moved into place when complete

Every output file's Parquet metadata (key ``mtcls_commit``) says which rows of which input file
(and version) it holds, and the checksum of its ids. A rerun reads these footers to skip rows
already scored; the final check reads the ids back from storage. Every change the driver makes
(clearing, removing stale or duplicate files, the manifest, ``_SUCCESS``) is fenced: it first
checks on the store that this job still holds the lease.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from mtcls.profile import merge_profiles
from pipelines.sink.base import Checksums, Committed, Problem, Resume, Sink, Verification, missing_inputs
from pipelines.sink.completion import MANIFEST_FILE as MANIFEST
from pipelines.sink.completion import SUCCESS_FILE as SUCCESS
from pipelines.sink.cover import exact_cover, merge_ranges
from pipelines.sink.lock import OutputLock
from pipelines.sink.records import COMMIT_KEY
from pipelines.sink.schema import METADATA_KEY
from pipelines.sink.units import InputFile, Unit
from pipelines.sink.write import write_units
from pipelines.storage import InputError, Location, redact_uri, write_json

log = logging.getLogger(__name__)

LOCK_PREFIX = "lock"  # the lease files of pipelines.sink.lock


class ParquetSink(Sink):
    """A directory of Parquet files, committed one at a time, with a manifest and ``_SUCCESS``.

    Args:
        loc: The output directory.
        lock_timeout_s: The lease's timeout (see :class:`pipelines.sink.lock.OutputLock`).
        prune_missing: Remove the committed rows of input files the input no longer lists
            (otherwise such an output is refused before any work).
        owner: Extra fields of the lease record (job name, ...).
    """

    def __init__(self, loc: Location, lock_timeout_s: float = 120.0, prune_missing: bool = False,
                 owner: Optional[dict[str, Any]] = None) -> None:
        self.loc = loc
        self.internal = loc.join("_mtcls")
        self.staging = self.internal.join("staging")
        self.lock_timeout_s = lock_timeout_s
        self.prune_missing = prune_missing
        self.owner = owner or {}
        self.lock: Optional[OutputLock] = None

    # --- open ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def open(self, overwrite: bool, inputs: Optional[dict[str, InputFile]] = None) -> Iterator["ParquetSink"]:
        """Refuses a foreign output (and, given ``inputs``, one holding rows of inputs no longer listed)
        before anything is touched, then takes the lease and prepares the directory."""
        self.check_owner(overwrite)
        if inputs is not None and not overwrite:
            self._check_missing(self.committed(), inputs)
        lock = OutputLock(self.loc, timeout_s=self.lock_timeout_s, heartbeat_s=min(15.0, self.lock_timeout_s / 4), owner=self.owner)
        with lock:
            self.lock = lock
            try:
                self.prepare(overwrite)
                yield self
            finally:
                self.lock = None

    def fence(self) -> None:
        """Raises :class:`pipelines.sink.lock.LockLostError` unless this job still holds the lease."""
        if self.lock is not None:
            self.lock.check()

    def check_owner(self, overwrite: bool) -> None:
        """Refuses a non-empty directory that mtcls did not write (nothing of the user's is touched).

        Runs before the lock is taken (the lock creates ``_mtcls/``).
        """
        fs = self.loc.fs
        if overwrite:
            return
        if fs.exists(self.loc.path) and fs.ls(self.loc.path) and not fs.exists(self.internal.path):
            raise InputError(
                f"output directory {redact_uri(self.loc.uri())!r} is not empty and was not written by mtcls; "
                "choose another output or set overwrite=true"
            )
        if fs.exists(self.loc.join("_delta_log").path):
            raise InputError(
                f"output {redact_uri(self.loc.uri())!r} is a Delta table: score into it with output_format=delta, "
                "choose another output, or set overwrite=true to replace it with a Parquet directory"
            )

    def prepare(self, overwrite: bool) -> None:
        """Empties the directory on ``overwrite`` (keeping the lock), and clears leftover staging."""
        fs = self.loc.fs
        if overwrite and fs.exists(self.loc.path):
            self.fence()
            for path in fs.ls(self.loc.path, detail=False):
                if posixpath.basename(path) != "_mtcls":
                    fs.rm(path, recursive=True)
            for path in fs.ls(self.internal.path, detail=False) if fs.exists(self.internal.path) else []:
                if not posixpath.basename(path).startswith(LOCK_PREFIX):
                    fs.rm(path, recursive=True)
        if fs.exists(self.staging.path):
            self.fence()
            fs.rm(self.staging.path, recursive=True)  # a killed job's half-written files
        fs.makedirs(self.staging.path, exist_ok=True)

    # --- resume -------------------------------------------------------------------------------

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
                raise InputError(f"output file {redact_uri(self.loc.uri(path))!r} is unreadable ({type(exc).__name__}: {exc}); "
                                 "delete it and rerun, or rerun with overwrite=true") from exc
            if meta is None:
                raise InputError(f"output file {redact_uri(self.loc.uri(path))!r} has no commit record; "
                                 "it was not written by this version of mtcls: rerun with overwrite=true")
            return Committed(name, rows, json.loads(meta), layout)

        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(names) or 1))) as pool:
            return list(pool.map(read, names))

    def remove(self, names: list[str]) -> None:
        """Deletes committed files of this output (fenced)."""
        if names:
            self.fence()
        for name in names:
            self.loc.fs.rm(self.loc.join(name).path)

    def resume(self, units: list[Unit], inputs: dict[str, InputFile]) -> Resume:
        """Marks the rows of each unit already in the output; removes files of inputs that changed.

        A committed file belongs to an input file and version (URI and fingerprint). Files of an
        input whose content changed hold stale rows: they are deleted and the input is scored
        again. Files of an input that the input no longer lists are kept, and the run is refused
        before any work, unless ``prune_missing``.

        Raises:
            InputError: Naming the input files that are gone and the keys that remove their rows.
        """
        current = {(f.uri, f.fingerprint): path for path, f in inputs.items()}
        files = self.committed()
        missing = self._check_missing(files, inputs)
        stale = [f.name for f in files if f.source not in current]
        if stale:
            log.warning("%d output files belong to input files that changed%s since they were scored; "
                        "removing them (their inputs are rescored)", len(stale), " or were removed" if missing else "")
            self.remove(stale)
        kept = [f for f in files if f.source in current]
        done: dict[str, list[list[int]]] = {}
        for f in kept:
            done.setdefault(current[f.source], []).extend(f.ranges)
        for u in units:
            end = u.first_row + u.rows
            u.done = [[max(a, u.first_row), min(b, end)] for a, b in merge_ranges(done.get(u.path, [])) if a < end and b > u.first_row]
        return Resume(kept, stale)

    def _check_missing(self, files: list[Committed], inputs: dict[str, InputFile]) -> list[str]:
        """:func:`pipelines.sink.base.missing_inputs` for this output."""
        return missing_inputs(files, inputs, self.prune_missing, self.loc.uri())

    # --- write + commit -----------------------------------------------------------------------

    def write_stage(self, units: list[Unit], inputs: dict[str, InputFile], schema: pa.Schema,
                    profile_heads: Optional[list[dict]]) -> tuple[Any, dict[str, Any]]:
        files = list(inputs)
        file_index = {p: i for i, p in enumerate(files)}
        return write_units, dict(
            units=[{**u.to_dict(), "file": file_index[u.path]} for u in units], schema=schema, out_fs=self.loc.fs,
            out_root=self.loc.path, staging=self.staging.path, input_uris=[inputs[p].uri for p in files],
            fingerprints=[inputs[p].fingerprint for p in files], fence=self.lock.fence() if self.lock else None,
            profile_heads=profile_heads,
        )

    def commit(self, written: pa.Table) -> None:
        """Nothing to do: each file was committed by the task that wrote it (a fenced move into place)."""

    # --- verify + finish ----------------------------------------------------------------------

    def verify(self, inputs: dict[str, InputFile], checksums: Checksums) -> Verification:
        """Proves every input row is in the output exactly once, from what is on disk.

        Per input file, the committed files must hold each of its rows once; files that repeat
        rows others already hold (a retried task that cut its rows differently) are removed.
        Then the ids of every kept file are read back from storage, and their checksums summed
        per input file must equal the checksum of that input file's ids, read from the input.

        Args:
            inputs: The input files by path.
            checksums: Reads ids back from storage (:data:`pipelines.sink.base.Checksums`).
        """
        result = Verification()
        by_input: dict[tuple[str, str], list[Committed]] = {}
        for f in self.committed():
            by_input.setdefault(f.source, []).append(f)
        for inp in inputs.values():
            chosen, extra, problem = exact_cover(inp.rows, by_input.get((inp.uri, inp.fingerprint), []))
            if problem:
                result.problems.append(Problem(redact_uri(inp.uri), problem))
            result.duplicates_removed += [f.name for f in extra]
            result.files += chosen
        if result.duplicates_removed:
            log.warning("removing %d output files whose rows other files already hold", len(result.duplicates_removed))
            self.remove(result.duplicates_removed)
        paths = [(self.loc.fs, self.loc.join(f.name).path) for f in result.files]
        paths += [(inp.fs, path) for path, inp in inputs.items()]
        read_back = checksums(paths)
        sums: dict[tuple[str, str], int] = {}
        for f, count in zip(result.files, read_back):
            if count.rows != f.commit["rows"]:
                result.problems.append(Problem(f.name, f"its footer says {f.commit['rows']} rows, {count.rows} were read back"))
            sums[f.source] = (sums.get(f.source, 0) + count.checksum) % 2**64
        for inp, count in zip(inputs.values(), read_back[len(result.files):]):
            result.null_ids += count.nulls
            result.duplicate_ids += count.duplicates
            uri = redact_uri(inp.uri)
            if not any(p.where == uri for p in result.problems) and sums.get((inp.uri, inp.fingerprint), 0) != count.checksum:
                result.problems.append(Problem(uri, "the ids in the output differ from the ids in the input"))
        result.rows_out = sum(f.rows for f in result.files)
        result.rows_error = sum(f.commit["errors"] for f in result.files)
        result.rows_truncated = sum(f.commit["truncated"] for f in result.files)
        result.profile = merge_profiles([f.commit["profile"] for f in result.files if "profile" in f.commit])
        result.rows_unprofiled = sum(f.rows for f in result.files if "profile" not in f.commit)
        return result

    def finish(self, manifest: dict[str, Any], verification: Verification) -> None:
        """Writes ``_manifest.json``; writes ``_SUCCESS`` if verification passed, else removes it and raises.

        Raises:
            LockLostError: This job no longer holds the lease (nothing is written).
            RuntimeError: Verification failed (the manifest says why; no ``_SUCCESS``).
        """
        success = self.loc.join(SUCCESS)
        complete = manifest["status"] == "complete"
        self.fence()
        if not complete and self.loc.fs.exists(success.path):
            self.loc.fs.rm(success.path)
        write_json(self.loc.join(MANIFEST), manifest)
        if not complete:
            raise RuntimeError(
                f"output {redact_uri(self.loc.uri())} holds {manifest['rows_out']} rows for {manifest['rows_in']} input rows; "
                f"{'; '.join(map(str, verification.problems[:5]))}; _SUCCESS not written (rerun to complete it)"
            )
        self.fence()
        with self.loc.fs.open(success.path, "w") as fh:
            fh.write("")

    def mark_incomplete(self) -> None:
        """Removes ``_SUCCESS`` before new rows go in (fenced)."""
        success = self.loc.join(SUCCESS)
        if self.loc.fs.exists(success.path):
            self.fence()
            self.loc.fs.rm(success.path)


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
            raise InputError(f"output {redact_uri(uri)!r} holds files written with {what}, e.g. {f.name}; "
                             "rerun with overwrite=true, or choose another output")


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
