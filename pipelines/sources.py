"""Where a job's rows come from: a Parquet file or directory, a Delta Lake table at one version, or
an Iceberg table at one snapshot.

A Delta table is read through its log: the data files of the version read (the latest, or the one
pinned with ``input_version``), never the directory listing, which also holds files the table
removed. An Iceberg table is read through its catalog: the data files of the snapshot read (the
current one, or ``input_snapshot``). Either way the data files are plain Parquet files that the
table never rewrites in place, so they are planned, fingerprinted and read exactly as the files of
a directory: a rerun after appends finds the old files committed and scores only the new ones.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import unquote

from pipelines.config import ConfigError
from pipelines.storage import InputError, Location, delta_storage_options, list_parquet_files, locate, redact_uri

log = logging.getLogger(__name__)

#: The directory that makes a directory a Delta table.
DELTA_LOG = "_delta_log"


@dataclass(frozen=True)
class InputSource:
    """The input as planned.

    Attributes:
        loc: The input location (a file, a directory or the table's root).
        files: Parquet data files to read, paths on ``loc.fs``, in a stable order.
        format: ``parquet`` or ``delta``.
        version: The Delta table version read (None for Parquet).
    """

    loc: Location
    files: list[str]
    format: str
    version: Optional[int] = None
    table: str = ""

    def describe(self) -> dict[str, Any]:
        """What a manifest records of the input: its URI (credentials removed), format and version
        (an Iceberg table: its name, and the snapshot id as the version)."""
        out: dict[str, Any] = {"uri": redact_uri(self.loc.uri()), "format": self.format}
        if self.table:
            out["table"] = self.table
        if self.version is not None:
            out["version"] = self.version
        return out

    @property
    def name(self) -> str:
        """How messages name the input: its URI, or ``iceberg table <name>``."""
        return f"iceberg table {self.table}" if self.table else redact_uri(self.loc.uri())


def is_delta_table(loc: Location) -> bool:
    """Whether ``loc`` is a directory holding a Delta log (never over HTTP(S): a URL names one file)."""
    if loc.protocol in ("http", "https"):
        return False
    try:
        return loc.fs.isdir(loc.join(DELTA_LOG).path)
    except OSError:
        return False


def resolve_input(loc: Location, input_format: str = "auto", version: Optional[int] = None,
                  needed: tuple[str, ...] = ()) -> InputSource:
    """The data files of the input, read by its format.

    Args:
        loc: The input location.
        input_format: ``auto`` (a directory holding ``_delta_log/`` is a Delta table, anything
            else Parquet), ``parquet`` or ``delta``.
        version: The Delta version to read; None: the latest.
        needed: Columns the job reads (a Delta table's partition columns are not in its data
            files, so a needed one is refused).

    Raises:
        ConfigError: ``input_version`` on a Parquet input; ``input_format=delta`` without deltalake.
        InputError: Missing input, a Delta table that cannot be read at that version, or one with
            features this reader cannot apply (deletion vectors, column mapping); a Delta table read
            as plain Parquet.
    """
    delta = input_format == "delta" or (input_format == "auto" and is_delta_table(loc))
    if not delta:
        if version is not None:
            raise ConfigError(f"key 'input_version': {redact_uri(loc.uri())!r} is not a Delta table (no {DELTA_LOG}/); "
                              f"input_version pins a Delta table's version")
        if is_delta_table(loc):
            raise InputError(f"input {redact_uri(loc.uri())!r} is a Delta table: read as a Parquet directory it would include "
                             f"data files the table removed; use input_format=auto or delta")
        return InputSource(loc, list_parquet_files(loc), "parquet")
    return _delta_source(loc, version, needed)


def _delta_source(loc: Location, version: Optional[int], needed: tuple[str, ...]) -> InputSource:
    try:
        from deltalake import DeltaTable
    except ImportError as exc:
        raise ConfigError("key 'input_format': a Delta table input needs the deltalake package: pip install 'mtcls[delta]'") from exc
    uri = redact_uri(loc.uri())
    options = delta_storage_options(loc)
    if not DeltaTable.is_deltatable(loc.uri(), options):
        raise InputError(f"input {uri!r} is not a Delta table (no readable {DELTA_LOG}/)")
    try:
        dt = DeltaTable(loc.uri(), version=version, storage_options=options)
    except Exception as exc:  # noqa: BLE001 - deltalake raises its own error types
        at = f" at version {version}" if version is not None else ""
        try:
            latest = f": the latest is {DeltaTable(loc.uri(), storage_options=options).version()}" if version is not None else ""
        except Exception:  # noqa: BLE001 - the table does not open at all: the first error says why
            latest = ""
        raise InputError(f"cannot read Delta table {uri!r}{at}{latest} ({type(exc).__name__}: {exc})") from exc
    features = set(dt.protocol().reader_features or [])
    config = dt.metadata().configuration
    if "deletionVectors" in features and _has_deletion_vectors(dt):
        raise InputError(f"Delta table {uri!r} has deletion vectors at version {dt.version()}, which this job does not "
                         f"apply (it reads whole data files); purge them first (Spark: REORG TABLE ... APPLY (PURGE))")
    if config.get("delta.columnMapping.mode", "none") != "none":
        raise InputError(f"Delta table {uri!r} uses column mapping ({config['delta.columnMapping.mode']}): its data files "
                         f"name columns differently from the table; this job cannot read it")
    partition = [c for c in needed if c in (dt.metadata().partition_columns or [])]
    if partition:
        raise InputError(f"Delta table {uri!r}: column(s) {partition} are partition columns, which are not in its data "
                         f"files; this job reads only data columns")
    paths = sorted(unquote(p) for p in dt.get_add_actions(flatten=True).column("path").to_pylist())
    if not paths:
        raise InputError(f"Delta table {uri!r} holds no data files at version {dt.version()}")
    root = loc.uri().rstrip("/") + "/"
    files = [posixpath.join(loc.path, p[len(root):] if p.startswith(root) else p) for p in paths]
    outside = [p for p in paths if ("://" in p or p.startswith("/")) and not p.startswith(root)]
    if outside:
        raise InputError(f"Delta table {uri!r} references data files outside its directory (a shallow clone?), e.g. "
                         f"{redact_uri(outside[0])}; this job reads only files under the table")
    log.debug("input %s: Delta table version %d, %d data files", uri, dt.version(), len(files))
    return InputSource(loc, files, "delta", dt.version())


def _has_deletion_vectors(dt: Any) -> bool:
    """Whether any data file of the loaded version has a deletion vector (a table may enable the
    feature and have none; one that disabled it may still have some). Unreadable: assume it has."""
    try:
        return any(batch.num_rows for batch in dt.deletion_vectors())
    except Exception:  # noqa: BLE001 - refuse rather than read deleted rows
        return True


def resolve_iceberg(table: str, snapshot: Optional[int], catalog: dict[str, str], needed: tuple[str, ...] = ()) -> InputSource:
    """The data files of an Iceberg table at one snapshot, through its catalog.

    Args:
        table: ``namespace.name``.
        snapshot: The snapshot id to read; None: the current snapshot.
        catalog: pyiceberg ``load_catalog`` properties (``type``, ``uri``, ``warehouse`` ...); the
            catalog's name is ``name`` (default ``default``). Empty: pyiceberg's own configuration
            (``~/.pyiceberg.yaml``, ``PYICEBERG_CATALOG__*`` variables).
        needed: Columns the job reads (checked against the table's schema).

    Raises:
        ConfigError: pyiceberg missing, or the catalog cannot be loaded (naming ``catalog``).
        InputError: No such table or snapshot, a table without data, delete files (this job reads
            whole data files), a needed column missing, or data files in a format other than Parquet.
    """
    try:
        from pyiceberg.catalog import load_catalog
    except ImportError as exc:
        raise ConfigError("key 'input_table': an Iceberg input needs pyiceberg: pip install 'mtcls[iceberg]'") from exc
    props = dict(catalog)
    name = props.pop("name", "default")
    try:
        cat = load_catalog(name, **props)
    except Exception as exc:  # noqa: BLE001 - pyiceberg raises several types for a bad catalog config
        raise ConfigError(f"key 'catalog': cannot load Iceberg catalog {name!r}: {type(exc).__name__}: {exc}") from exc
    try:
        tbl = cat.load_table(table)
    except Exception as exc:  # noqa: BLE001 - NoSuchTableError, NoSuchNamespaceError ...
        raise InputError(f"cannot load Iceberg table {table!r} from catalog {name!r}: {type(exc).__name__}: {exc}") from exc
    if snapshot is None:
        current = tbl.current_snapshot()
        if current is None:
            raise InputError(f"Iceberg table {table!r} has no snapshot (no data)")
        snapshot = current.snapshot_id
    elif tbl.snapshot_by_id(snapshot) is None:
        known = [s.snapshot_id for s in tbl.snapshots()][-5:]
        raise InputError(f"Iceberg table {table!r} has no snapshot {snapshot} (the latest: {known})")
    columns = tbl.schema().column_names
    missing = [c for c in needed if c not in columns]
    if missing:
        raise InputError(f"Iceberg table {table!r} has no column(s) {missing}; its columns: {columns}")
    for column in needed:  # data files are read by column name: a name must mean one field in every schema
        ids = {sch.find_field(column).field_id for sch in tbl.schemas().values() if column in sch.column_names}
        if len(ids) > 1:
            raise InputError(f"Iceberg table {table!r}: column {column!r} named different fields in its schema history "
                             f"(a rename or a reused name); this job reads data files by column name and cannot read it")
    try:
        tasks = list(tbl.scan(snapshot_id=snapshot).plan_files())
    except ValueError as exc:  # pyiceberg refuses to plan equality deletes
        raise InputError(f"Iceberg table {table!r} at snapshot {snapshot} cannot be read as whole data files: {exc}") from exc
    deletes = [t.file.file_path for t in tasks if t.delete_files]
    if deletes:
        raise InputError(f"Iceberg table {table!r} at snapshot {snapshot} has delete files (row-level deletes) on "
                         f"{len(deletes)} data files, e.g. {redact_uri(deletes[0])}; this job reads whole data files: "
                         f"rewrite the table's data files first (Spark: CALL system.rewrite_data_files)")
    other = [t.file.file_path for t in tasks if str(t.file.file_format).upper().split(".")[-1] != "PARQUET"]
    if other:
        raise InputError(f"Iceberg table {table!r}: data file {redact_uri(other[0])} is not Parquet; this job reads Parquet")
    if not tasks:
        raise InputError(f"Iceberg table {table!r} holds no data files at snapshot {snapshot}")
    root = locate(tbl.location())
    same_store = {"s3": "s3", "s3a": "s3"}
    files = []
    for t in tasks:
        loc = locate(t.file.file_path)
        if same_store.get(loc.protocol, loc.protocol) != same_store.get(root.protocol, root.protocol):
            raise InputError(f"Iceberg table {table!r}: data file {redact_uri(t.file.file_path)} is on another store than "
                             f"the table ({redact_uri(root.uri())}); this job reads one store per input")
        files.append(loc.path)
    return InputSource(root, sorted(files), "iceberg", snapshot, table)
