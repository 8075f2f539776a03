"""The Delta Lake backend: every input row committed once, through the table's own log.

Layout (Delta readers see only the files the log references; they skip ``_``-prefixed paths)::

    <table>/_delta_log/                              the table's log (deltalake)
    <table>/part-<input>-<row>-<rows>-<run>.parquet  data files, in the table once a commit adds them
    <table>/_mtcls/commits/<epoch>/<commit>.json     each commit attempt's records (rows of which input, checksums)
    <table>/_mtcls/manifest.json                     the last run's manifest
    <table>/_mtcls/lock*.json                        the live job's lease (``lock=true``)

Write tasks write each unit's rows (:func:`pipelines.sink.write.unit_parts`) as a data file named
from its input file, its rows and the run, which no reader sees yet, and return the file's record.
The driver commits the records it received in batches, one table version per commit:

1. (lease on) check the fence; reload the table.
2. Read the live records (below); a file whose rows a live record of the same input version holds
   is deleted, one that shares only some rows is cut to the rest (a new file), so a retried or
   concurrent commit never adds a row twice.
3. Write the attempt's record file, then commit the add actions with the transaction id
   ``mtcls-commit-<commit>`` and ``max_commit_retries=0``: delta-rs refuses the commit if the
   table moved since step 1 (it does not refuse a transaction id already in the log, and with
   retries it would rebase an append without this check), and the driver goes back to step 1.

A record file counts when its commit's transaction id is in the table: transaction ids persist
through checkpoints and compaction, which rewrites data files and drops their Parquet footers, so
nothing is read from footers. A removal (stale or duplicate files) is one commit of remove actions
whose record file retires the records it removes. ``overwrite`` replaces the table in a new version
with a new epoch (table property ``mtcls.epoch``); records of other epochs never count.

Data files that no version references (left by a killed or conflicting job) are never read by a
table reader; at start a job deletes those older than the lease timeout (younger ones may be
another live job's, about to be committed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import random
import re
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Iterator, Optional
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import AddAction, CommitProperties, RemoveAction, Transaction

from mtcls import HeadSpec
from mtcls.profile import merge_profiles
from pipelines.sink.base import (Checksums, Committed, Problem, Resume, Sink, Verification, mark_done,
                                 missing_inputs)
from pipelines.sink.completion import PROP_METADATA, PROP_STATUS
from pipelines.sink.cover import exact_cover, merge_ranges
from pipelines.sink.lock import OutputLock
from pipelines.sink.lock_stores import check_conditional_writes
from pipelines.sink.parquet import output_layout
from pipelines.sink.records import output_name, row_ranges
from pipelines.sink.schema import METADATA_KEY
from pipelines.sink.units import InputFile, Unit
from pipelines.sink.write import WRITTEN_SCHEMA, file_record, unit_parts, written_record
from pipelines.storage import InputError, Location, delta_storage_options, redact_uri

log = logging.getLogger(__name__)

#: Table properties mtcls sets (strings, like every Delta table property).
PROP_FORMAT = "mtcls.format"
PROP_EPOCH = "mtcls.epoch"
PROP_COLUMNS = "mtcls.layout.columns"
PROP_MODEL_HASH = "mtcls.layout.model"
PROP_MODEL = "mtcls.model"
PROP_HEADS = "mtcls.heads"

FORMAT_VERSION = "1"
APP_ID_PREFIX = "mtcls-commit-"
LOCK_PREFIX = "lock"  # the lease files of pipelines.sink.lock
#: A data file of this backend: ``<output_name stem>-<run>.parquet``.
DATA_FILE = re.compile(r"^part-[0-9a-f]{12}-\d{10}-[0-9a-f]{12}-[0-9a-f]{12}\.parquet$")
COMMIT_FILE = re.compile(r"^(\d+)\.json$")
LOG_COMMIT = re.compile(r"^\d{20}\.json$")
COMMIT_ATTEMPTS = 64  # commit conflicts in a row before giving up
LOG_SLACK_S = 3600.0  # how far before an unreferenced file's mtime log commits are searched for it

#: One row per data file a write task wrote: :data:`WRITTEN_SCHEMA` plus its size, mtime and record.
DELTA_WRITTEN_SCHEMA = pa.schema(list(WRITTEN_SCHEMA) + [pa.field("size", pa.int64()), pa.field("modified_ms", pa.int64()),
                                                         pa.field("record", pa.string())])


class TableReplacedError(RuntimeError):
    """The table was replaced (``overwrite``) or deleted by another job while this one wrote to it."""


def delta_schema(schema: pa.Schema) -> pa.Schema:
    """The output schema as a Delta table stores it (fixed-size lists become lists, unsigned
    integers signed, ...), with the output schema's metadata.

    Raises:
        InputError: Naming a column Delta Lake has no type for (``float16``, ...).
    """
    for f in schema:
        try:
            DeltaSchema.from_arrow(pa.schema([f]))
        except Exception as exc:  # deltalake raises a bare Exception for an unsupported type
            raise InputError(f"column {f.name!r} ({f.type}) cannot be stored in a Delta Lake table "
                             f"({str(exc).splitlines()[0]}); leave it out or use output_format=parquet") from None
    return pa.schema(DeltaSchema.from_arrow(schema).to_arrow()).with_metadata(schema.metadata or {})


def expected_layout(schema: pa.Schema) -> dict[str, str]:
    """:func:`pipelines.sink.parquet.output_layout` of the schema as Parquet gives it back."""
    buffer = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), buffer)
    return output_layout(pq.read_schema(pa.BufferReader(buffer.getvalue())))


def data_file_name(part_name: str, run_id: str) -> str:
    """A data file's name: the unit part's name (input file, version, rows) and the run that wrote it.

    A retried task of the run writes the same name (and replaces its file, not yet committed); two
    runs never write one name, so a job never replaces a file another job committed.
    """
    return f"{part_name[:-len('.parquet')]}-{run_id}.parquet"


def app_id(commit_id: int) -> str:
    """The transaction id (Delta ``txn`` app id) that marks a commit attempt as committed."""
    return f"{APP_ID_PREFIX}{commit_id}"


def write_delta_files(batch: pa.Table, units: list[dict[str, Any]], schema: pa.Schema, out_fs: Any, out_root: str,
                      run_id: str, input_uris: list[str], fingerprints: list[str], fence: Any = None,
                      profile_heads: Optional[list[dict]] = None) -> pa.Table:
    """Writes one data file per unit of the block into the table directory, uncommitted (a ``map_batches`` function).

    Args:
        batch: Scored rows: the output columns plus ``__unit``, ``__row`` and ``__precision``.
        units: Every unit of the run (:meth:`pipelines.sink.units.Unit.to_dict`, with ``file``).
        schema: The table's schema (:func:`delta_schema`).
        out_fs: The output filesystem.
        out_root: The table directory.
        run_id: This run's id (in the file names).
        input_uris: The input files' URIs (as recorded), by file index.
        fingerprints: The input files' versions, by file index.
        fence: Checked before each file is written (:class:`pipelines.sink.lock.Fence`); None: no lease.
        profile_heads: The heads whose prediction profile each record carries.

    Returns:
        One row per file (:data:`DELTA_WRITTEN_SCHEMA`): its path relative to the table, size,
        rows, counts, precision, and its record as JSON (input URI, fingerprint, ranges, id
        checksum, counts, precision, profile). Nothing is in the table until the driver commits it.

    Raises:
        LockLostError: The job lost its lease.
    """
    rows = []
    for part in unit_parts(batch, units, schema, input_uris, fingerprints, profile_heads):
        if fence is not None:
            fence.check()
        name = data_file_name(part.name, run_id)
        path = posixpath.join(out_root, name)
        # No commit record in the footer: the log and the record files are the truth (compaction drops footers).
        with out_fs.open(path, "wb") as fh:
            pq.write_table(part.table.replace_schema_metadata(schema.metadata), fh, compression="zstd")
        size, modified_ms = _stat(out_fs, path)
        record = {**part.commit, "key": part.name[:-len(".parquet")], "path": name, "size": size, "modified_ms": modified_ms}
        rows.append({**written_record(part, name), "size": size, "modified_ms": modified_ms, "record": json.dumps(record)})
    return pa.Table.from_pylist(rows, schema=DELTA_WRITTEN_SCHEMA)


class DeltaSink(Sink):
    """A Delta Lake table, each input row committed once through its log (see the module docstring).

    Args:
        loc: The table directory (local or an object store URI).
        schema: The output schema (:func:`pipelines.sink.schema.output_schema`).
        lock: Hold a lease (:class:`pipelines.sink.lock.OutputLock`) while open; without it jobs
            may write the table at the same time and still commit each row once.
        lock_timeout_s: The lease's timeout; also the age after which unreferenced data files are removed.
        prune_missing: Remove the committed rows of input files the input no longer lists
            (otherwise such a table is refused before any work).
        owner: Extra fields of the lease record (job name, ...).
        commit_every_files: The driver commits every this many written files ...
        commit_every_s: ... or when a written file has waited this long, and at the end.
        storage_options: deltalake's storage options; None: derived from the environment.

    Raises:
        InputError: A column Delta Lake cannot store.
    """

    def __init__(self, loc: Location, schema: pa.Schema, lock: bool = True, lock_timeout_s: float = 120.0,
                 prune_missing: bool = False, owner: Optional[dict[str, Any]] = None, commit_every_files: int = 20,
                 commit_every_s: float = 30.0, storage_options: Optional[dict[str, str]] = None) -> None:
        self.loc = loc
        self.uri = loc.uri()
        self.schema = schema
        self.table_schema = delta_schema(schema)
        self.layout = expected_layout(schema)
        self.use_lock = lock
        self.lock_timeout_s = lock_timeout_s
        self.prune_missing = prune_missing
        self.owner = owner or {}
        self.commit_every_files = commit_every_files
        self.commit_every_s = commit_every_s
        self.storage_options = delta_storage_options(loc) if storage_options is None else storage_options
        self.internal = loc.join("_mtcls")
        self.run_id = uuid.uuid4().hex[:12]
        self.lock: Optional[OutputLock] = None
        self.epoch: Optional[str] = None
        self.profile_specs: list[HeadSpec] = []
        self._dt: Optional[DeltaTable] = None
        self._record_files: dict[tuple[str, str], dict[str, Any]] = {}  # (epoch, name) -> content (immutable)
        self._present: set[tuple[str, int]] = set()  # (epoch, commit id) whose transaction id is in the table
        self._verified: Optional[dict[str, Any]] = None
        self._mutex = threading.Lock()

    # --- the table ----------------------------------------------------------------------------

    def table(self) -> Optional[DeltaTable]:
        """The table at its latest version, or None where there is none."""
        if self._dt is not None:
            try:
                self._dt.update_incremental()
                return self._dt
            except Exception:  # noqa: BLE001 - replaced or deleted under us: load it afresh
                self._dt = None
        if not DeltaTable.is_deltatable(self.uri, self.storage_options):
            return None
        self._dt = DeltaTable(self.uri, storage_options=self.storage_options)
        return self._dt

    def _current_table(self) -> DeltaTable:
        """The table, still the one this job opened (same epoch).

        Raises:
            TableReplacedError: It is gone, or another job replaced it (``overwrite``).
        """
        dt = self.table()
        epoch = dt.metadata().configuration.get(PROP_EPOCH) if dt is not None else None
        if dt is None or (self.epoch is not None and epoch != self.epoch):
            raise TableReplacedError(f"table {redact_uri(self.uri)!r} was {'deleted' if dt is None else 'replaced by another job (overwrite)'} "
                                     "while this job wrote to it; this job must not commit")
        return dt

    def current_files(self, dt: DeltaTable) -> dict[str, int]:
        """The table's data files at this version: path relative to the table -> size."""
        actions = pa.table(dt.get_add_actions(flatten=True))
        return {unquote(p): int(s) for p, s in zip(actions.column("path").to_pylist(), actions.column("size_bytes").to_pylist())}

    def _data_path(self, rel: str) -> str:
        """A data file's path on the output filesystem."""
        if "://" in rel:  # an absolute URI (a shallow clone's files): file:///a/b -> /a/b, s3://b/k -> b/k
            return rel.split("://", 1)[1]
        return rel if rel.startswith("/") else self.loc.join(rel).path

    # --- open ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def open(self, overwrite: bool, inputs: Optional[dict[str, InputFile]] = None) -> Iterator["DeltaSink"]:
        """Refuses a foreign output or one written with other columns or another model (and, given
        ``inputs``, one holding rows of inputs no longer listed), and an S3 store without
        conditional writes, before anything is touched (but a probe object under ``_mtcls/``), takes
        the lease (``lock``), then replaces the table (``overwrite``) or creates it, and removes
        data files that no version references."""
        dt = self.table()
        self.check_owner(overwrite, dt)
        check_conditional_writes(self.loc, "a Delta table output")
        if dt is not None and not overwrite:
            self.check_table(dt)
            if inputs is not None:
                missing_inputs(self.live(dt), inputs, self.prune_missing, self.uri)
        if not self.use_lock:
            self.prepare(overwrite)
            yield self
            return
        lock = OutputLock(self.loc, timeout_s=self.lock_timeout_s, heartbeat_s=min(15.0, self.lock_timeout_s / 4), owner=self.owner)
        with lock:
            self.lock = lock
            try:
                self.prepare(overwrite)
                yield self
            finally:
                self.lock = None

    def fence(self) -> None:
        """Raises :class:`pipelines.sink.lock.LockLostError` unless this job still holds the lease (no lease: nothing)."""
        if self.lock is not None:
            self.lock.check()

    def check_owner(self, overwrite: bool, dt: Optional[DeltaTable]) -> None:
        """Refuses, unless ``overwrite``, a Delta table mtcls did not write and a non-empty directory that is no Delta table.

        Raises:
            InputError: Naming the output and the way out.
        """
        if overwrite:
            return
        shown = redact_uri(self.uri)
        if dt is not None:
            if PROP_EPOCH not in dt.metadata().configuration:
                raise InputError(f"output {shown!r} is a Delta table that mtcls did not write; choose another output or "
                                 "set overwrite=true (which replaces its contents in a new table version)")
            return
        fs = self.loc.fs
        fs.invalidate_cache(self.loc.path)
        entries = [posixpath.basename(p.rstrip("/")) for p in fs.ls(self.loc.path, detail=False)] if fs.exists(self.loc.path) else []
        others = [e for e in entries if e not in ("_mtcls", "_delta_log")]
        if not others:
            return  # empty, or a table another job (lock=false) is creating: its first log entry is not there yet
        if fs.exists(self.internal.path) and "_delta_log" not in entries:
            raise InputError(f"output {shown!r} holds an mtcls Parquet output (output_format=parquet); choose another "
                             "output, or set overwrite=true to replace it with a Delta table")
        raise InputError(f"output directory {shown!r} is not empty and is not a Delta table written by mtcls; "
                         "choose another output or set overwrite=true")

    def check_table(self, dt: DeltaTable) -> None:
        """Refuses a table written with other columns or another model, or one that expires transaction ids.

        Raises:
            InputError: Naming what differs and the way out (``overwrite=true``).
        """
        conf = dt.metadata().configuration
        if conf.get("delta.setTransactionRetentionDuration"):
            raise InputError(f"table {redact_uri(self.uri)!r} sets delta.setTransactionRetentionDuration: mtcls finds its "
                             "commits by their transaction ids, which that property expires; unset it")
        if conf.get(PROP_COLUMNS) != self.layout["columns"]:
            raise InputError(f"output {redact_uri(self.uri)!r} is a table with other columns than this run writes "
                             f"(table: [{conf.get(PROP_COLUMNS)}]; this run: [{self.layout['columns']}]); "
                             "rerun with overwrite=true, or choose another output")
        if conf.get(PROP_MODEL_HASH) != self.layout["model"]:
            raise InputError(f"output {redact_uri(self.uri)!r} is a table written with another model (weights, heads, "
                             "thresholds or temperatures) than this run uses; rerun with overwrite=true, or choose another output")

    def properties(self, epoch: str) -> dict[str, str]:
        """The table properties of a new (or replaced) table: epoch, layout, labels, heads and model."""
        meta = json.loads((self.schema.metadata or {}).get(METADATA_KEY, b"{}"))
        heads = [{k: h.get(k) for k in ("name", "kind", "labels", "groups", "columns")} for h in meta.get("heads", [])]
        return {PROP_FORMAT: FORMAT_VERSION, PROP_EPOCH: epoch, PROP_COLUMNS: self.layout["columns"],
                PROP_MODEL_HASH: self.layout["model"], PROP_MODEL: json.dumps(meta.get("model", {}), sort_keys=True),
                PROP_HEADS: json.dumps(heads), PROP_METADATA: json.dumps(meta), PROP_STATUS: "incomplete"}

    def prepare(self, overwrite: bool) -> None:
        """Replaces the table on ``overwrite`` (or empties a directory that is no table), creates it
        where there is none, and removes data files no version references (fenced)."""
        fs = self.loc.fs
        dt = self.table()
        if overwrite:
            self.fence()
            epoch = uuid.uuid4().hex
            if dt is not None:
                # CREATE OR REPLACE: one new version without any file, new epoch; the history stays readable.
                DeltaTable.create(self.uri, self.table_schema, mode="overwrite", configuration=self.properties(epoch),
                                  storage_options=self.storage_options, raise_if_key_not_exists=False,
                                  commit_properties=CommitProperties(custom_metadata={"mtcls.operation": "overwrite",
                                                                                      "mtcls.run": self.run_id}))
            elif fs.exists(self.loc.path):
                for path in fs.ls(self.loc.path, detail=False):
                    if posixpath.basename(path.rstrip("/")) != "_mtcls":
                        fs.rm(path, recursive=True)
            for path in fs.ls(self.internal.path, detail=False) if fs.exists(self.internal.path) else []:
                if not posixpath.basename(path.rstrip("/")).startswith(LOCK_PREFIX):
                    fs.rm(path, recursive=True)  # record files of the old epochs, the old manifest
            self._dt = None
            dt = self.table()
        if dt is None:
            self.fence()
            try:
                DeltaTable.create(self.uri, self.table_schema, mode="error", configuration=self.properties(uuid.uuid4().hex),
                                  storage_options=self.storage_options, raise_if_key_not_exists=False,
                                  commit_properties=CommitProperties(custom_metadata={"mtcls.operation": "create",
                                                                                      "mtcls.run": self.run_id}))
            except Exception:  # noqa: BLE001 - another job (lock=false) created it first: use theirs if it fits
                if self.table() is None:
                    raise
            dt = self.table()
            assert dt is not None
            self.check_table(dt)
        self.epoch = dt.metadata().configuration[PROP_EPOCH]
        self.remove_orphans(dt)

    def remove_orphans(self, dt: DeltaTable) -> list[str]:
        """Deletes this backend's data files that no table version references, once older than the lease timeout.

        A file counts as referenced when the current version holds it or a log commit written
        since shortly before the file adds or removes it (so time travel to older versions keeps
        working); younger files may belong to another live job that has not committed them yet.

        Returns:
            The names deleted.
        """
        fs = self.loc.fs
        fs.invalidate_cache(self.loc.path)
        current = self.current_files(dt)
        now = time.time()
        old = {}
        for info in fs.ls(self.loc.path, detail=True):
            name = posixpath.basename(info["name"].rstrip("/"))
            if DATA_FILE.match(name) and name not in current:
                modified = _mtime_s(info)
                if modified is not None and now - modified > self.lock_timeout_s:
                    old[name] = modified
        if not old:
            return []
        orphans = sorted(set(old) - self._logged_paths(min(old.values()) - LOG_SLACK_S))
        if orphans:
            self.fence()
            log.info("removing %d data files of %s that no table version references (left by a killed or conflicting job)",
                     len(orphans), redact_uri(self.uri))
            for name in orphans:
                fs.rm(self.loc.join(name).path)
        return orphans

    def _logged_paths(self, since: float) -> set[str]:
        """Paths that log commits modified at or after ``since`` (seconds since the epoch) add or remove."""
        fs = self.loc.fs
        folder = self.loc.join("_delta_log")
        fs.invalidate_cache(folder.path)
        paths: set[str] = set()
        for info in fs.ls(folder.path, detail=True):
            name = posixpath.basename(info["name"])
            modified = _mtime_s(info)
            if not LOG_COMMIT.match(name) or (modified is not None and modified < since):
                continue
            with fs.open(info["name"], "r") as fh:
                for line in fh:
                    action = json.loads(line) if line.strip() else {}
                    for kind in ("add", "remove"):
                        if kind in action:
                            paths.add(unquote(action[kind]["path"]))
        return paths

    # --- records ------------------------------------------------------------------------------

    def live(self, dt: DeltaTable) -> list[Committed]:
        """The records the table's current version holds: those of committed attempts, less retired ones.

        Each :class:`Committed` is named by its data file (relative path); its ``commit`` is the
        record, with ``commit_id``; its ``layout`` the table's.
        """
        conf = dt.metadata().configuration
        epoch = conf.get(PROP_EPOCH)
        if epoch is None:
            return []
        fs = self.loc.fs
        folder = self.internal.join("commits", epoch)
        fs.invalidate_cache(folder.path)
        names = sorted(posixpath.basename(p) for p in fs.ls(folder.path, detail=False)) if fs.exists(folder.path) else []
        names = [n for n in names if COMMIT_FILE.match(n)]
        committed = []
        for name in names:
            commit_id = int(COMMIT_FILE.match(name).group(1))
            if (epoch, commit_id) not in self._present:
                if dt.transaction_version(app_id(commit_id)) is None:
                    continue  # an attempt that did not commit (a conflict, or a kill before the log write)
                self._present.add((epoch, commit_id))
            committed.append(name)
        unread = [n for n in committed if (epoch, n) not in self._record_files]

        def read(name: str) -> dict[str, Any]:
            with fs.open(folder.join(name).path, "r") as fh:
                return json.load(fh)

        with ThreadPoolExecutor(max_workers=max(1, min(16, len(unread) or 1))) as pool:
            for name, content in zip(unread, pool.map(read, unread)):
                self._record_files[(epoch, name)] = content
        added: dict[tuple[int, str], dict[str, Any]] = {}
        retired: set[tuple[int, str]] = set()
        for name in committed:
            content = self._record_files[(epoch, name)]
            for record in content.get("added", []):
                added[(content["commit"], record["key"])] = {**record, "commit_id": content["commit"]}
            retired.update((c, k) for c, k in content.get("retired", []))
        layout = {"columns": conf.get(PROP_COLUMNS, ""), "model": conf.get(PROP_MODEL_HASH, "")}
        return [Committed(r["path"], r["rows"], r, layout) for entry, r in sorted(added.items()) if entry not in retired]

    def _write_record_file(self, content: dict[str, Any]) -> None:
        """Writes an attempt's record file (complete before the commit that makes it count)."""
        fs = self.loc.fs
        target = self.internal.join("commits", self.epoch or "", f"{content['commit']}.json")
        fs.makedirs(posixpath.dirname(target.path), exist_ok=True)
        data = json.dumps(content)
        if self.loc.protocol == "file":  # a local write is not atomic: write aside, then rename
            tmp = f"{target.path}.{uuid.uuid4().hex[:8]}.tmp"
            with fs.open(tmp, "w") as fh:
                fh.write(data)
            fs.mv(tmp, target.path)
        else:  # an object store PUT is
            with fs.open(target.path, "w") as fh:
                fh.write(data)

    # --- resume -------------------------------------------------------------------------------

    def resume(self, units: list[Unit], inputs: dict[str, InputFile]) -> Resume:
        """Marks the rows of each unit the table holds; retires the records of inputs that changed.

        Records of an input file whose content changed (or, with ``prune_missing``, that the input
        no longer lists) are removed in one commit and the input is scored again.

        Raises:
            InputError: Inputs no longer listed (without ``prune_missing``), or stale rows that
                compaction merged into files with other rows (only ``overwrite`` removes those).
        """
        dt = self._current_table()
        files = self.live(dt)
        missing = missing_inputs(files, inputs, self.prune_missing, self.uri)
        current = {(f.uri, f.fingerprint) for f in inputs.values()}
        stale = [f for f in files if f.source not in current]
        if stale:
            log.warning("%d committed files belong to input files that changed%s since they were scored; "
                        "removing them (their inputs are rescored)", len(stale), " or were removed" if missing else "")
            self.retire(stale, "stale")
        kept = [f for f in files if f.source in current]
        mark_done(units, kept, inputs)
        return Resume(kept, [f.name for f in stale])

    # --- write + commit -----------------------------------------------------------------------

    def write_stage(self, units: list[Unit], inputs: dict[str, InputFile], schema: pa.Schema,
                    profile_heads: Optional[list[dict]]) -> tuple[Any, dict[str, Any]]:
        files = list(inputs)
        file_index = {p: i for i, p in enumerate(files)}
        self.profile_specs = [HeadSpec.from_dict(h) for h in profile_heads or []]
        return write_delta_files, dict(
            units=[{**u.to_dict(), "file": file_index[u.path]} for u in units], schema=delta_schema(schema),
            out_fs=self.loc.fs, out_root=self.loc.path, run_id=self.run_id, input_uris=[inputs[p].uri for p in files],
            fingerprints=[inputs[p].fingerprint for p in files], fence=self.lock.fence() if self.lock else None,
            profile_heads=profile_heads,
        )

    def commit(self, written: pa.Table) -> pa.Table:
        """Commits the files a write-stage batch reported as one table version (none already held).

        Returns:
            Rows of :data:`DELTA_WRITTEN_SCHEMA` for what this commit put in the table (files cut
            to the rows no other record held included; files wholly held elsewhere left out).
        """
        with self._mutex:
            return self._commit_records([json.loads(r) for r in written.column("record").to_pylist()])

    def iter_commits(self, batches: Iterator[pa.Table]) -> Iterator[pa.Table]:
        """Commits what the write stage reports every ``commit_every_files`` files, when a file has
        waited ``commit_every_s`` seconds (a timer thread), and at the end; yields what each commit put in.

        If ``batches`` fails, the files received so far are committed before the error propagates.
        """
        buffer: list[dict[str, Any]] = []
        ready: list[pa.Table] = []
        failure: list[BaseException] = []
        oldest = [0.0]
        stop = threading.Event()

        def flush() -> None:  # under the mutex
            if buffer:
                todo = list(buffer)
                buffer.clear()
                committed = self._commit_records(todo)
                if committed.num_rows:
                    ready.append(committed)

        def tick() -> None:
            while not stop.wait(min(1.0, self.commit_every_s)):
                with self._mutex:
                    if failure:
                        return
                    if buffer and time.monotonic() - oldest[0] >= self.commit_every_s:
                        try:
                            flush()
                        except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread
                            failure.append(exc)
                            return

        def take() -> list[pa.Table]:
            with self._mutex:
                if failure:
                    raise failure[0]
                out = list(ready)
                ready.clear()
            return out

        timer = threading.Thread(target=tick, name="mtcls-delta-commit", daemon=True)
        timer.start()
        try:
            try:
                for batch in batches:
                    with self._mutex:
                        if failure:
                            raise failure[0]
                        if not buffer:
                            oldest[0] = time.monotonic()
                        buffer.extend(json.loads(r) for r in batch.column("record").to_pylist())
                        if len(buffer) >= self.commit_every_files or time.monotonic() - oldest[0] >= self.commit_every_s:
                            flush()
                    yield from take()
            except Exception:
                stop.set()
                timer.join()
                with self._mutex:
                    if buffer and not failure:
                        with contextlib.suppress(Exception):
                            flush()
                raise
            stop.set()
            timer.join()
            with self._mutex:
                if not failure:
                    flush()
            yield from take()
        finally:
            stop.set()
            timer.join()

    def _commit_records(self, records: list[dict[str, Any]]) -> pa.Table:
        """The commit loop (see the module docstring); the caller holds the mutex."""
        result: list[dict[str, Any]] = []
        pending = list(records)
        cuts: dict[str, dict[str, Any]] = {}  # original path -> the cut written for it (not committed yet)
        tried: set[str] = set()  # paths this call's attempts committed, or tried to
        for attempt in range(COMMIT_ATTEMPTS):
            self.fence()
            dt = self._current_table()
            live = self.live(dt)
            held = {f.name for f in live}
            taken: dict[tuple[str, str], list[list[int]]] = {}
            for f in live:
                taken.setdefault(f.source, []).extend(f.ranges)
            accepted, unneeded = [], []
            for record in pending:
                cut = cuts.get(record["path"])
                if record["path"] in held:  # committed already: by an earlier attempt (its error came after the commit) or call
                    result += [record] if record["path"] in tried else []
                    continue
                if cut is not None and cut["path"] in held:
                    result += [cut] if cut["path"] in tried else []
                    self._delete([record])
                    continue
                source = (record["input"], record["fingerprint"])
                free = _free_ranges(record["ranges"], merge_ranges(taken.get(source, [])))
                if not free:
                    unneeded.append(record)
                    continue
                if free != record["ranges"]:
                    if cut is None or cut["ranges"] != free:
                        if cut is not None:
                            self._delete([cut])
                        cut = cuts[record["path"]] = self._cut(record, free)
                    chosen = cut
                else:
                    chosen = record
                taken.setdefault(source, []).extend(chosen["ranges"])
                accepted.append((record, chosen))
            absent = self._absent([c for _, c in accepted])
            if absent:
                log.warning("%d written files are gone or changed before their commit (not committed; a rerun scores "
                            "their rows): %s", len(absent), ", ".join(sorted(absent)[:3]))
            self._delete(unneeded + [cuts.pop(r["path"]) for r in unneeded if r["path"] in cuts])
            if unneeded:
                log.info("%d written files hold only rows the table already has (another job or attempt committed "
                         "them): deleted, not committed", len(unneeded))
            accepted = [(r, c) for r, c in accepted if c["path"] not in absent]
            if not accepted:
                break
            commit_id = _new_commit_id()
            chosen_records = [c for _, c in accepted]
            tried.update(c["path"] for c in chosen_records)
            self._write_record_file({"commit": commit_id, "epoch": self.epoch, "run": self.run_id, "added": chosen_records})
            adds = [AddAction(c["path"], c["size"], {}, c["modified_ms"], True, json.dumps({"numRecords": c["rows"]}))
                    for c in chosen_records]
            props = CommitProperties(
                custom_metadata={"mtcls.commit": str(commit_id), "mtcls.run": self.run_id,
                                 "mtcls.rows": sum(c["rows"] for c in chosen_records),
                                 "mtcls.keys": [c["key"] for c in chosen_records]},
                max_commit_retries=0, app_transactions=[Transaction(app_id(commit_id), commit_id)])
            try:
                dt.create_write_transaction(adds, "append", dt.schema(), commit_properties=props)
            except CommitFailedError as exc:
                log.info("commit attempt %d on %s conflicted with another commit (%s); reloading and checking again",
                         attempt + 1, redact_uri(self.uri), str(exc).splitlines()[0])
                pending = [r for r, _ in accepted]
                time.sleep(random.uniform(0.05, 0.25) * min(attempt + 1, 8))
                continue
            self._present.add((self.epoch or "", commit_id))
            for original, chosen in accepted:
                if chosen is not original:
                    self._delete([original])  # its rows are committed through the cut
            result += chosen_records
            break
        else:
            raise RuntimeError(f"could not commit to {redact_uri(self.uri)!r}: {COMMIT_ATTEMPTS} attempts in a row "
                               "conflicted with other commits")
        return pa.Table.from_pylist([_written_row(r) for r in result], schema=DELTA_WRITTEN_SCHEMA)

    def _cut(self, record: dict[str, Any], ranges: list[list[int]]) -> dict[str, Any]:
        """Writes a new data file with the rows of ``record``'s file in ``ranges`` (a subset of its
        ranges) and returns its record; the file's rows are sorted by row, so the k-th row is the
        k-th row number of its ranges."""
        fs = self.loc.fs
        with fs.open(self._data_path(record["path"]), "rb") as fh:
            table = pq.read_table(fh).cast(self.table_schema)
        numbers = np.concatenate([np.arange(a, b) for a, b in record["ranges"]])
        keep = np.zeros(len(numbers), dtype=bool)
        for a, b in ranges:
            keep |= (numbers >= a) & (numbers < b)
        table = table.filter(pa.array(keep))
        new_ranges = row_ranges(numbers[keep])
        part_name = output_name(record["input"], record["fingerprint"], new_ranges)
        name = data_file_name(part_name, self.run_id)
        path = self._data_path(name)
        with fs.open(path, "wb") as fh:
            pq.write_table(table.replace_schema_metadata(self.table_schema.metadata), fh, compression="zstd")
        size, modified_ms = _stat(fs, path)
        specs = self.profile_specs if "profile" in record else []
        commit = file_record(table, record["input"], record["fingerprint"], new_ranges, record["precision"], specs)
        return {**commit, "key": part_name[:-len(".parquet")], "path": name, "size": size, "modified_ms": modified_ms}

    def _absent(self, records: list[dict[str, Any]]) -> set[str]:
        """Paths of records whose data file is missing or has another size than recorded."""
        fs = self.loc.fs

        def ok(record: dict[str, Any]) -> bool:
            try:
                return _stat(fs, self._data_path(record["path"]))[0] == record["size"]
            except FileNotFoundError:
                return False

        if not records:
            return set()
        with ThreadPoolExecutor(max_workers=min(16, len(records))) as pool:
            return {r["path"] for r, good in zip(records, pool.map(ok, records)) if not good}

    def _delete(self, records: list[dict[str, Any]]) -> None:
        """Deletes data files that no commit references (never this table's files)."""
        for record in records:
            with contextlib.suppress(FileNotFoundError):
                self.loc.fs.rm(self._data_path(record["path"]))

    def retire(self, files: list[Committed], why: str) -> list[str]:
        """Removes committed files from the table in one commit whose record file retires their records.

        Returns:
            The names removed (files another job had already removed are left out).

        Raises:
            InputError: A file to remove is no longer in the table: compaction rewrote its rows
                together with others (only ``overwrite`` removes those).
        """
        for attempt in range(COMMIT_ATTEMPTS):
            self.fence()
            dt = self._current_table()
            live = {(f.commit["commit_id"], f.commit["key"]) for f in self.live(dt)}
            targets = [f for f in files if (f.commit["commit_id"], f.commit["key"]) in live]
            if not targets:
                return []
            current = self.current_files(dt)
            gone = [f for f in targets if f.name not in current]
            if gone:
                raise InputError(
                    f"table {redact_uri(self.uri)!r}: {len(gone)} committed files to remove ({why}) are no longer in the "
                    f"table, e.g. {gone[0].name}: a compaction rewrote their rows together with others. Nothing was "
                    "changed; rerun with overwrite=true")
            commit_id = _new_commit_id()
            self._write_record_file({"commit": commit_id, "epoch": self.epoch, "run": self.run_id, "why": why,
                                     "retired": [[f.commit["commit_id"], f.commit["key"]] for f in targets]})
            now_ms = int(time.time() * 1000)
            removes = [RemoveAction(f.name, True, now_ms, current[f.name], {}) for f in targets]
            props = CommitProperties(custom_metadata={"mtcls.commit": str(commit_id), "mtcls.run": self.run_id,
                                                      "mtcls.removed": why, "mtcls.keys": [f.commit["key"] for f in targets]},
                                     max_commit_retries=0, app_transactions=[Transaction(app_id(commit_id), commit_id)])
            try:
                dt.create_write_transaction(removes, "append", dt.schema(), commit_properties=props)
            except CommitFailedError:
                time.sleep(random.uniform(0.05, 0.25) * min(attempt + 1, 8))
                continue
            self._present.add((self.epoch or "", commit_id))
            return [f.name for f in targets]
        raise RuntimeError(f"could not commit to {redact_uri(self.uri)!r}: {COMMIT_ATTEMPTS} attempts in a row "
                           "conflicted with other commits")

    # --- verify + finish ----------------------------------------------------------------------

    def verify(self, inputs: dict[str, InputFile], checksums: Checksums) -> Verification:
        """Proves every input row is in the table exactly once, from the table's current version.

        Per input file, the live records must hold each of its rows once (records that repeat
        rows others hold are removed in one commit), and their id checksums must sum to the
        checksum of the input file's ids. The ids of the table's current files are read back: a
        file with its own record must hold that record's rows and ids, and all files together
        exactly the ids of all live records (files compaction rewrote are checked this way).

        Args:
            inputs: The input files by path.
            checksums: Reads ids back from storage (:data:`pipelines.sink.base.Checksums`).
        """
        result = Verification()
        dt = self._current_table()
        live = self.live(dt)
        by_input: dict[tuple[str, str], list[Committed]] = {}
        for f in live:
            by_input.setdefault(f.source, []).append(f)
        extra: list[Committed] = []
        for inp in inputs.values():
            chosen, redundant, problem = exact_cover(inp.rows, by_input.get((inp.uri, inp.fingerprint), []))
            if problem:
                result.problems.append(Problem(redact_uri(inp.uri), problem))
            extra += redundant
            result.files += chosen
        if extra:
            log.warning("removing %d committed files whose rows other files already hold", len(extra))
            result.duplicates_removed = self.retire(extra, "duplicate")
            dt = self._current_table()
            live = self.live(dt)
        if dt.protocol().reader_features and "deletionVectors" in dt.protocol().reader_features:
            result.problems.append(Problem(redact_uri(self.uri), "the table uses deletion vectors, which this check does not read"))
        current = self.current_files(dt)
        names = sorted(current)
        paths = [(self.loc.fs, self._data_path(n)) for n in names] + [(inp.fs, path) for path, inp in inputs.items()]
        read_back = checksums(paths)
        by_name = {f.name: f for f in live}
        table_rows, table_sum = 0, 0
        for name, count in zip(names, read_back):
            table_rows += count.rows
            table_sum = (table_sum + count.checksum) % 2**64
            f = by_name.get(name)
            if f is not None and (count.rows != f.rows or str(count.checksum) != f.commit["checksum"]):
                result.problems.append(Problem(name, f"its record says {f.rows} rows, {count.rows} were read back "
                                                     f"(or their ids differ)"))
        live_rows = sum(f.rows for f in live)
        live_sum = sum(int(f.commit["checksum"]) for f in live) % 2**64
        if table_rows != live_rows or table_sum != live_sum:
            result.problems.append(Problem(redact_uri(self.uri), f"its current files hold {table_rows} rows, its committed "
                                                                 f"records {live_rows}{' (their ids differ)' if table_rows == live_rows else ''}"))
        sums: dict[tuple[str, str], int] = {}
        for f in result.files:
            sums[f.source] = (sums.get(f.source, 0) + int(f.commit["checksum"])) % 2**64
        for inp, count in zip(inputs.values(), read_back[len(names):]):
            result.null_ids += count.nulls
            result.duplicate_ids += count.duplicates
            uri = redact_uri(inp.uri)
            if not any(p.where == uri for p in result.problems) and sums.get((inp.uri, inp.fingerprint), 0) != count.checksum:
                result.problems.append(Problem(uri, "the ids in the output differ from the ids in the input"))
        result.rows_out = table_rows
        result.rows_error = sum(f.commit["errors"] for f in result.files)
        result.rows_truncated = sum(f.commit["truncated"] for f in result.files)
        result.profile = merge_profiles([f.commit["profile"] for f in result.files if "profile" in f.commit])
        result.rows_unprofiled = sum(f.rows for f in result.files if "profile" not in f.commit)
        self._verified = {"version": dt.version(), "rows": table_rows, "checksum": table_sum}
        return result

    def finish(self, manifest: dict[str, Any], verification: Verification) -> None:
        """Writes ``_mtcls/manifest.json``; if verification passed, records the completion in the
        table properties (one commit), else marks the table incomplete and raises.

        Raises:
            LockLostError: This job no longer holds the lease (nothing is written).
            TableReplacedError: Another job replaced the table.
            RuntimeError: Verification failed (the manifest says why).
        """
        complete = manifest["status"] == "complete"
        self.fence()
        target = self.internal.join("manifest.json")
        self._write_json(target, manifest)
        if not complete:
            self._set_status({PROP_STATUS: "incomplete"})
            raise RuntimeError(
                f"table {redact_uri(self.uri)} holds {manifest['rows_out']} rows for {manifest['rows_in']} input rows; "
                f"{'; '.join(map(str, verification.problems[:5]))}; marked incomplete (rerun to complete it)"
            )
        verified = self._verified or {}
        props = {PROP_STATUS: "complete", "mtcls.rows": str(verified.get("rows", manifest["rows_out"])),
                 "mtcls.ids_checksum": str(verified.get("checksum", "")),
                 PROP_MODEL: json.dumps(manifest.get("model", {}), sort_keys=True, default=str),
                 "mtcls.manifest": redact_uri(target.uri()), "mtcls.verified_version": str(verified.get("version", "")),
                 "mtcls.completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._set_status(props)

    def mark_incomplete(self) -> None:
        """Marks the table incomplete (table property ``mtcls.status``) before new rows go in (fenced)."""
        dt = self._current_table()
        if dt.metadata().configuration.get(PROP_STATUS) != "incomplete":
            self._set_status({PROP_STATUS: "incomplete"})

    def _set_status(self, props: dict[str, str]) -> None:
        for attempt in range(COMMIT_ATTEMPTS):
            self.fence()
            dt = self._current_table()
            try:
                dt.alter.set_table_properties(props, raise_if_not_exists=False, commit_properties=CommitProperties(
                    custom_metadata={"mtcls.run": self.run_id, "mtcls.properties": props}))
                return
            except CommitFailedError:
                time.sleep(random.uniform(0.05, 0.25) * min(attempt + 1, 8))
        raise RuntimeError(f"could not set the properties of {redact_uri(self.uri)!r}: {COMMIT_ATTEMPTS} attempts conflicted")

    def _write_json(self, target: Location, data: Any) -> None:
        fs = self.loc.fs
        fs.makedirs(posixpath.dirname(target.path), exist_ok=True)
        with fs.open(target.path, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.write("\n")


def visible_ids(uri: str, column: str = "id", storage_options: Optional[dict[str, str]] = None) -> pa.ChunkedArray:
    """The ids a Delta table reader sees now (an empty array where there is no table yet; for tests and monitoring)."""
    if not DeltaTable.is_deltatable(uri, storage_options):
        return pa.chunked_array([], pa.string())
    return DeltaTable(uri, storage_options=storage_options).to_pyarrow_table(columns=[column]).column(column)


def _free_ranges(ranges: list[list[int]], taken: list[list[int]]) -> list[list[int]]:
    """The parts of ``ranges`` outside the merged ``taken`` ranges."""
    out = []
    for a, b in ranges:
        pos = a
        for c, d in taken:
            if d <= pos or c >= b:
                continue
            if c > pos:
                out.append([pos, c])
            pos = max(pos, d)
        if pos < b:
            out.append([pos, b])
    return merge_ranges(out)


def _written_row(record: dict[str, Any]) -> dict[str, Any]:
    return {"file": record["path"], "rows": record["rows"], "errors": record["errors"], "truncated": record["truncated"],
            "precision": record["precision"], "size": record["size"], "modified_ms": record["modified_ms"],
            "record": json.dumps(record)}


def _new_commit_id() -> int:
    """A commit attempt's id: microseconds since the epoch with random low digits (unique, roughly increasing)."""
    return time.time_ns() // 1000 * 1000 + secrets.randbelow(1000)


def _stat(fs: Any, path: str) -> tuple[int, int]:
    """A file's size and modification time (ms since the epoch)."""
    fs.invalidate_cache(path)
    info = fs.info(path)
    modified = _mtime_s(info)
    return int(info["size"]), int((modified if modified is not None else time.time()) * 1000)


def _mtime_s(info: dict[str, Any]) -> Optional[float]:
    """Modification time in seconds since the epoch from an fsspec ``info`` entry (local ``mtime``,
    object stores ``LastModified`` / ``mtime`` / ``updated``)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    return None
