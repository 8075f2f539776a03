"""Where the output lock lives: one compare-and-swap store per kind of filesystem.

See :mod:`pipelines.sink.lock` for the protocol. A store reads the lock (:class:`Snapshot`) and
swaps it for a new record only if it is still the version that was read.
"""

from __future__ import annotations

import contextlib
import abc
import errno
import hashlib
import json
import os
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

from pipelines.storage import InputError, Location, redact_uri

LOCK_DIR = "_mtcls"
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_S3_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


@dataclass(frozen=True)
class Snapshot:
    """The lock as read from the store.

    Attributes:
        record: The lock record; None when there is no lock object.
        version: What a compare-and-swap expects: generation (local), ETag (S3), digest (other).
        age_s: Seconds since the last heartbeat; None when unknown.
    """

    record: dict[str, Any] | None
    version: Any
    age_s: float | None

    @property
    def held(self) -> bool:
        return self.record is not None and not self.record.get("released")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _dump(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, default=str) + "\n").encode()


def _parse(data: bytes) -> dict[str, Any]:
    """A lock record; ``{"unreadable": True}`` for a torn or corrupt one (still counts as held)."""
    try:
        record = json.loads(data)
    except ValueError:
        return {"unreadable": True}
    return record if isinstance(record, dict) else {"unreadable": True}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Store(abc.ABC):
    """Where the lock lives, and its compare-and-swap."""

    atomic = True

    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """The lock file, for messages."""

    @abc.abstractmethod
    def read(self) -> Snapshot:
        """The current lock."""

    @abc.abstractmethod
    def swap(self, expected: Any, record: dict[str, Any]) -> Any | None:
        """Writes ``record`` if the lock's version is still ``expected``; the new version, or None if not."""

    def where(self, version: Any) -> str:
        """The lock file at a version, for messages."""
        return self.uri

    def refresh(self, version: Any, record: dict[str, Any]) -> Any | None:
        """Renews the heartbeat of the lock at ``version``; the new version, or None if it is no longer ours."""
        return self.swap(version, record)


class _LocalStore(Store):
    """Local disk: generation files created with ``link`` (create-if-absent); the highest one is the lock."""

    _NAME = re.compile(r"^lock\.(\d+)\.json$")

    def __init__(self, loc: Location) -> None:
        self.dir = loc.join(LOCK_DIR).path

    @property
    def uri(self) -> str:
        return os.path.join(self.dir, "lock.<n>.json")

    def where(self, version: int) -> str:
        return self._path(version)

    def _path(self, gen: int) -> str:
        return os.path.join(self.dir, f"lock.{gen}.json")

    def _gens(self) -> list[int]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return [int(m.group(1)) for name in names if (m := self._NAME.match(name))]

    def read(self) -> Snapshot:
        for _ in range(10):
            gens = self._gens()
            if not gens:
                return Snapshot(None, 0, None)
            gen = max(gens)
            try:
                with open(self._path(gen), "rb") as fh:
                    mtime = os.fstat(fh.fileno()).st_mtime
                    data = fh.read()
            except FileNotFoundError:
                continue  # removed by a newer generation's cleanup: list again
            return Snapshot(_parse(data), gen, max(0.0, time.time() - mtime))
        raise OSError(f"the lock files in {self.dir} keep changing")

    def swap(self, expected: int, record: dict[str, Any]) -> int | None:
        gen = expected + 1
        path = self._path(gen)
        os.makedirs(self.dir, exist_ok=True)
        if not _create_exclusive(path, _dump(record)):
            return None
        if max(self._gens()) != gen:  # older generations were cleaned up while this job stalled
            _unlink(path)
            return None
        self._cleanup(gen)
        return gen

    def refresh(self, version: int, record: dict[str, Any]) -> int | None:
        if max(self._gens(), default=0) != version:
            return None
        try:
            os.utime(self._path(version))  # touches only this job's own generation file
        except FileNotFoundError:
            return None
        return version

    def _cleanup(self, gen: int) -> None:
        """Removes generations below ``gen - 1`` (the previous holder looks for a newer one) and old temp files."""
        for old in self._gens():
            if old < gen - 1:
                _unlink(self._path(old))
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            if name.endswith(".tmp") and name.startswith("lock.") and _older_than(path, 3600):
                _unlink(path)


def _older_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime > seconds
    except FileNotFoundError:
        return False


def _create_exclusive(path: str, data: bytes) -> bool:
    """Creates ``path`` holding ``data`` unless it exists; True if this call created it.

    Writes a temp file and hard-links it into place, so readers never see a partial file; where
    hard links are unsupported, falls back to ``O_CREAT|O_EXCL`` (readers tolerate a torn record).
    """
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "xb") as fh:
        fh.write(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        return _create_o_excl(path, data)
    finally:
        _unlink(tmp)


def _create_o_excl(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return True


class _S3Store(Store):
    """S3 through s3fs: one object, changed only by conditional ``PutObject`` (If-None-Match / If-Match)."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc.join(LOCK_DIR, "lock.json")
        self.fs = loc.fs
        self.bucket, self.key, _ = self.fs.split_path(self.loc.path)

    @property
    def uri(self) -> str:
        return self.loc.uri()

    def read(self) -> Snapshot:
        from fsspec.asyn import sync

        try:
            resp, data = sync(self.fs.loop, self._get)
        except FileNotFoundError:
            return Snapshot(None, None, None)
        return Snapshot(_parse(data), resp["ETag"], _server_age(resp))

    async def _get(self) -> tuple[dict[str, Any], bytes]:
        resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
        try:
            return resp, await resp["Body"].read()
        finally:
            resp["Body"].close()

    def swap(self, expected: str | None, record: dict[str, Any]) -> str | None:
        condition = {"IfMatch": expected} if expected else {"IfNoneMatch": "*"}
        try:
            resp = self.fs.call_s3(
                "put_object", Bucket=self.bucket, Key=self.key, Body=_dump(record),
                ContentType="application/json", **condition,
            )
        except OSError as exc:
            if not _is_conflict(exc):
                raise
            return self._landed(record)
        return resp["ETag"]

    def _landed(self, record: dict[str, Any]) -> str | None:
        """After a failed condition: did this very write land (a retried request)? Its ETag if so."""
        snap = self.read()
        mine = snap.record is not None and all(snap.record.get(k) == record[k] for k in ("token", "beat"))
        return snap.version if mine else None


def check_conditional_writes(loc: Location, what: str) -> None:
    """Refuses an S3 store that does not honour conditional writes (``If-None-Match: *``).

    Delta commits (a log entry created only if absent) and the S3 lease depend on them; AWS S3 has
    them, some S3-compatible stores ignore the header and overwrite. The probe creates one object
    under ``_mtcls/`` twice: the second must fail. Other protocols: nothing to check.

    Args:
        loc: The output location.
        what: What needs them, named in the error (``output_format=delta`` ...).

    Raises:
        InputError: The store overwrote the probe, naming the output.
    """
    if loc.protocol not in ("s3", "s3a"):
        return
    probe = loc.join(LOCK_DIR, f"probe-{uuid.uuid4().hex}")
    bucket, key, _ = loc.fs.split_path(probe.path)

    def create(body: bytes) -> None:  # as the lease's compare-and-swap writes (_S3Store.swap)
        loc.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")

    create(b"1")
    try:
        create(b"2")
    except OSError as exc:  # s3fs: FileExistsError, or a plain OSError for a bare 412 (MinIO, Ceph)
        if _is_conflict(exc):
            return
        raise
    finally:
        with contextlib.suppress(OSError):
            loc.fs.rm(probe.path)
    raise InputError(f"the store of {redact_uri(loc.uri())!r} ignored a conditional write (If-None-Match: *): it overwrote "
                     f"an object that had to be created only if absent. {what} relies on such writes to never lose or "
                     f"double a commit; use a store that supports them (AWS S3 does; for MinIO or Ceph, a recent version)")


def _is_conflict(exc: BaseException) -> bool:
    """Whether an s3fs error is a failed write condition (412), a concurrent conditional write (409) or a missing key."""
    if isinstance(exc, (FileExistsError, FileNotFoundError)):  # If-None-Match failed / If-Match on no object
        return True
    cause = exc.__cause__
    response = getattr(cause, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code in _S3_CONFLICT_CODES or status in {"412", "409"}


def _server_age(resp: dict[str, Any]) -> float:
    """Seconds since the object was written, by the server's clock (whole seconds)."""
    modified: datetime = resp["LastModified"]
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    now = parsedate_to_datetime(date) if date else datetime.now(timezone.utc)
    return max(0.0, (now - modified).total_seconds())


class _BestEffortStore(Store):
    """Any other fsspec store: read, compare, write. Two jobs racing may both win."""

    atomic = False

    def __init__(self, loc: Location) -> None:
        self.loc = loc.join(LOCK_DIR, "lock.json")
        self.fs = loc.fs

    @property
    def uri(self) -> str:
        return self.loc.uri()

    def read(self) -> Snapshot:
        try:
            data = self.fs.cat_file(self.loc.path)
        except FileNotFoundError:
            return Snapshot(None, None, None)
        record = _parse(data)
        beat = record.get("heartbeat_epoch")
        age = max(0.0, time.time() - beat) if isinstance(beat, (int, float)) else None
        return Snapshot(record, hashlib.sha256(data).hexdigest(), age)

    def swap(self, expected: str | None, record: dict[str, Any]) -> str | None:
        if self.read().version != expected:
            return None
        data = _dump(record)
        self.fs.makedirs(posixpath.dirname(self.loc.path), exist_ok=True)
        self.fs.pipe_file(self.loc.path, data)
        return hashlib.sha256(data).hexdigest()


def store_for(loc: Location) -> Store:
    if loc.protocol == "file":
        return _LocalStore(loc)
    if loc.protocol in ("s3", "s3a") and hasattr(loc.fs, "_call_s3"):
        return _S3Store(loc)
    return _BestEffortStore(loc)
