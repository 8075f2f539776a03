"""Files through fsspec: any URI (local path, ``s3://``, ``gs://``, ``memory://`` ...) works alike."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class InputError(ValueError):
    """Input data is missing, unreadable or lacks a column; the message names the file or column."""


@dataclass(frozen=True)
class Location:
    """A filesystem and a path on it (no protocol), from a URI."""

    fs: Any
    path: str
    protocol: str

    def join(self, *parts: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, *parts), self.protocol)

    def uri(self, path: str | None = None) -> str:
        path = self.path if path is None else path
        if self.protocol == "file" or "://" in path:  # HTTP(S) filesystems keep the whole URL as the path
            return path
        return f"{self.protocol}://{path}"

    def arrow_fs(self) -> pafs.FileSystem:
        """The filesystem as pyarrow wants it (Ray Data reads and writes through this)."""
        if self.protocol == "file":
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))


def locate(uri: str) -> Location:
    """Resolves a URI or local path to a :class:`Location`.

    A local path is made canonical (absolute, ``..`` and symlinks resolved, as far as it exists),
    so one file reached by two spellings is one location.
    """
    fs, path = fsspec.core.url_to_fs(str(uri))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol == "local":
        protocol = "file"
    if protocol == "file":
        path = os.path.realpath(path)
    return Location(fs, path.rstrip("/") or "/", protocol)


#: What replaces a URL's query string and fragment in :func:`redact_uri`.
REDACTED = "REDACTED"


def redact_uri(uri: str) -> str:
    """The URI without credentials, for logs, manifests and reports.

    - User info is removed: ``s3://KEY:SECRET@bucket/p`` -> ``s3://bucket/p``, and
      ``https://user:pw@host/p`` -> ``https://host/p``. A secret pasted unencoded with a ``/`` in
      it (``s3://KEY:SE/CRET@bucket/p``) is removed too: when the part before the first ``/`` looks
      like ``user:password`` (a ``:`` not followed by a port number) and an ``@`` follows, everything
      up to that ``@`` is user info.
    - The whole query string and fragment are replaced by ``?REDACTED`` / ``#REDACTED``: signed
      URLs carry their signature, credential, token or session there under many names
      (``X-Amz-Signature``, ``Signature``, ``sig``, ``token`` ...), so no parameter is kept, not
      even harmless ones such as ``versionId``. The marker shows that something was removed.
    - A string without ``://`` (a local path, ``bucket/key``) is returned unchanged, as is a URI
      with nothing to remove.

    The result names the same place for a reader but is not meant to be opened again: a signed
    URL without its query no longer works.

    Args:
        uri: A local path or URI.

    Returns:
        The redacted URI.
    """
    uri = str(uri)
    head, sep, rest = uri.partition("://")
    if not sep:
        return uri
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    location, tail = rest[:cut], rest[cut:]
    netloc = location.split("/", 1)[0]
    if "@" in netloc:
        location = location[netloc.rindex("@") + 1:]
    elif ":" in netloc and "@" in location and not netloc.split(":", 1)[1].isdigit():
        location = location[location.index("@") + 1:]
    marks = ""
    if "?" in tail.split("#", 1)[0]:
        marks += f"?{REDACTED}"
    if "#" in tail:
        marks += f"#{REDACTED}"
    return f"{head}://{location}{marks}"


_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"()<>\]]+")


def redact_text(text: str) -> str:
    """``text`` with :func:`redact_uri` applied to every URI in it (error messages, log lines)."""
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)


class RedactingFilter(logging.Filter):
    """A logging filter that removes credentials from the URIs in a record's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


#: Dict keys whose values are secrets whatever they hold (an Iceberg catalog's ``credential``,
#: ``token``, ``s3.secret-access-key``, a ``password``).
_SECRET_KEY = re.compile(r"secret|passw|token|credential|signature|private", re.I)


def redact_uris(value: Any) -> Any:
    """``value`` with :func:`redact_uri` applied to every string in it (dict values and list items,
    walked and copied; dict keys are kept), and the value of every dict key that names a secret
    (``secret``, ``password``, ``token``, ``credential`` ...) replaced by ``REDACTED``."""
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) else redact_uris(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_uris(v) for v in value]
    return value


def delta_storage_options(loc: Location) -> dict[str, str]:
    """deltalake's storage options for ``loc``: credentials come from the environment, as for fsspec;
    a plain-HTTP S3 endpoint (``AWS_ENDPOINT_URL=http://...``, a test or on-premises store) is allowed."""
    if loc.protocol in ("s3", "s3a") and os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        return {"AWS_ALLOW_HTTP": "true"}
    return {}


def _hidden(path: str, root: str) -> bool:
    rel = posixpath.relpath(path, root)
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def list_parquet_files(loc: Location) -> list[str]:
    """Parquet files at a location: the file itself, or every ``*.parquet`` below a directory.

    Files and directories whose names start with ``_`` or ``.`` are skipped (markers, staging),
    as pyarrow, Spark and DuckDB do.

    Raises:
        InputError: If the path does not exist or holds no Parquet file.
    """
    if not loc.fs.exists(loc.path):
        raise InputError(f"input path {loc.uri()!r} does not exist")
    if loc.fs.isfile(loc.path):
        return [loc.path]
    files = sorted(
        p for p in loc.fs.find(loc.path) if p.endswith(".parquet") and not _hidden(p, loc.path)
    )
    if not files:
        raise InputError(f"input directory {loc.uri()!r} holds no .parquet files")
    return files


def read_footer(loc: Location, path: str) -> tuple[pa.Schema, int]:
    """The schema and row count of one Parquet file (reads its footer only).

    Raises:
        InputError: Naming the file whose footer is corrupt or unreadable.
    """
    try:
        with loc.fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            return pf.schema_arrow, pf.metadata.num_rows
    except Exception as exc:  # pyarrow raises several types for a bad footer
        raise InputError(f"cannot read Parquet file {loc.uri(path)!r}: {type(exc).__name__}: {exc}") from exc


def column_names(loc: Location, path: str) -> list[str]:
    """The column names of one Parquet file (reads its footer only)."""
    return read_footer(loc, path)[0].names


def inspect_parquet(loc: Location, files: list[str], required: list[str]) -> tuple[pa.Schema, dict[str, int]]:
    """Reads every file's footer: proves it is readable and has the required columns.

    Args:
        loc: Where the files are.
        files: Paths from :func:`list_parquet_files`.
        required: Columns the job reads.

    Returns:
        The schema of the required columns (from the first file), and the row count per file.

    Raises:
        InputError: Naming the file that is corrupt or unreadable, or the column it lacks.
    """
    rows: dict[str, int] = {}
    schema = None
    for path in files:
        file_schema, rows[path] = read_footer(loc, path)
        missing = [c for c in required if c not in file_schema.names]
        if missing:
            raise InputError(
                f"Parquet file {loc.uri(path)!r} has no column(s) {missing}; its columns: {file_schema.names}"
            )
        selected = pa.schema([file_schema.field(c) for c in required])
        if schema is None:
            schema = selected
        elif not selected.equals(schema):
            raise InputError(
                f"Parquet file {loc.uri(path)!r} has column types {selected} unlike the first file's {schema}"
            )
    assert schema is not None
    return schema, rows


def write_json(loc: Location, data: Any) -> None:
    """Writes JSON (indented, keys in order) to a location."""
    loc.fs.makedirs(posixpath.dirname(loc.path), exist_ok=True)
    with loc.fs.open(loc.path, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.write("\n")


def read_json(loc: Location) -> Any:
    with loc.fs.open(loc.path, "r") as fh:
        return json.load(fh)
