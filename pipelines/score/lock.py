"""One writer per output: a lease lock on an output directory, on local disk, S3 and (best effort) elsewhere.

A job takes the lock before it touches its output and keeps it alive with a heartbeat from a
daemon thread. A second job on the same output fails at once with :class:`LockHeldError`, which
names the holder. A holder that died (no heartbeat for ``timeout_s``) is taken over by the next job.

Every change of the lock (acquire, take over, release) is a compare-and-swap on the store, so of
several jobs racing for a free or stale lock exactly one wins:

* Local disk (or a shared POSIX mount): the lock is a series of generation files
  ``<output>/_mtcls/lock.<n>.json``; the highest ``n`` is the lock. A change from generation ``n``
  creates ``lock.<n+1>.json`` with ``os.link`` (create-if-absent; ``O_CREAT|O_EXCL`` where links are
  unsupported), which only one creator can do. The holder's heartbeat touches the mtime of its own
  generation file, so it never overwrites another job's lock. Release writes a "released" generation.
* S3 (s3fs): the lock is the object ``<output>/_mtcls/lock.json``. Acquire is ``PutObject`` with
  ``If-None-Match: *``; take over, heartbeat and release are ``PutObject`` with ``If-Match: <ETag>``
  (AWS S3 and moto support both). The heartbeat age is measured on the server's clock
  (``Date`` minus ``Last-Modified``), so clock skew between hosts does not matter.
* Any other fsspec store (``memory://``, ``gs://`` ...): read, compare, write. Not atomic: a warning
  is logged that exactly one writer is not guaranteed there.

A holder that stalls longer than the timeout (a suspended VM, a long GC pause) may be taken over
while it still runs. It notices at its next heartbeat (:attr:`OutputLock.lost`); a job calls
:meth:`OutputLock.check` right before it commits, which verifies the lock on the store.
"""

from __future__ import annotations

import abc
import errno
import getpass
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any

from pipelines.storage import InputError, Location, locate

log = logging.getLogger(__name__)

LOCK_DIR = "_mtcls"
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_HEARTBEAT_S = 15.0
_CAS_ATTEMPTS = 5  # re-reads after a lost compare-and-swap before giving up
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_S3_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


class LockHeldError(InputError):
    """The output is locked by another live job; the message names it and says when it may be taken over.

    Attributes:
        holder: The holder's lock record (host, pid, run_id, started_at, ...).
        age_s: Seconds since the holder's last heartbeat.
        takeover_in_s: Seconds until the lock may be taken over if no heartbeat comes.
    """

    def __init__(
        self, message: str, holder: dict[str, Any] | None = None, age_s: float = 0.0, takeover_in_s: float = 0.0
    ) -> None:
        super().__init__(message)
        self.holder = holder or {}
        self.age_s = age_s
        self.takeover_in_s = takeover_in_s


class LockLostError(InputError):
    """This job's lock on its output was taken over by another job: it must not commit."""


@dataclass(frozen=True)
class _Snapshot:
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


def _now_iso() -> str:
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


class _Store(abc.ABC):
    """Where the lock lives, and its compare-and-swap."""

    atomic = True

    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """The lock file, for messages."""

    @abc.abstractmethod
    def read(self) -> _Snapshot:
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


class _LocalStore(_Store):
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

    def read(self) -> _Snapshot:
        for _ in range(10):
            gens = self._gens()
            if not gens:
                return _Snapshot(None, 0, None)
            gen = max(gens)
            try:
                with open(self._path(gen), "rb") as fh:
                    mtime = os.fstat(fh.fileno()).st_mtime
                    data = fh.read()
            except FileNotFoundError:
                continue  # removed by a newer generation's cleanup: list again
            return _Snapshot(_parse(data), gen, max(0.0, time.time() - mtime))
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


class _S3Store(_Store):
    """S3 through s3fs: one object, changed only by conditional ``PutObject`` (If-None-Match / If-Match)."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc.join(LOCK_DIR, "lock.json")
        self.fs = loc.fs
        self.bucket, self.key, _ = self.fs.split_path(self.loc.path)

    @property
    def uri(self) -> str:
        return self.loc.uri()

    def read(self) -> _Snapshot:
        from fsspec.asyn import sync

        try:
            resp, data = sync(self.fs.loop, self._get)
        except FileNotFoundError:
            return _Snapshot(None, None, None)
        return _Snapshot(_parse(data), resp["ETag"], _server_age(resp))

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


class _BestEffortStore(_Store):
    """Any other fsspec store: read, compare, write. Two jobs racing may both win."""

    atomic = False

    def __init__(self, loc: Location) -> None:
        self.loc = loc.join(LOCK_DIR, "lock.json")
        self.fs = loc.fs

    @property
    def uri(self) -> str:
        return self.loc.uri()

    def read(self) -> _Snapshot:
        try:
            data = self.fs.cat_file(self.loc.path)
        except FileNotFoundError:
            return _Snapshot(None, None, None)
        record = _parse(data)
        beat = record.get("heartbeat_epoch")
        age = max(0.0, time.time() - beat) if isinstance(beat, (int, float)) else None
        return _Snapshot(record, hashlib.sha256(data).hexdigest(), age)

    def swap(self, expected: str | None, record: dict[str, Any]) -> str | None:
        if self.read().version != expected:
            return None
        data = _dump(record)
        self.fs.makedirs(posixpath.dirname(self.loc.path), exist_ok=True)
        self.fs.pipe_file(self.loc.path, data)
        return hashlib.sha256(data).hexdigest()


def _store_for(loc: Location) -> _Store:
    if loc.protocol == "file":
        return _LocalStore(loc)
    if loc.protocol in ("s3", "s3a") and hasattr(loc.fs, "_call_s3"):
        return _S3Store(loc)
    return _BestEffortStore(loc)


class OutputLock:
    """A lease on an output directory: one writer at a time; a dead holder is taken over after a timeout.

    Use as a context manager (acquires on entry, releases on exit) or call :meth:`acquire` and
    :meth:`release`. While held, a daemon thread renews the heartbeat every ``heartbeat_s``.

    Args:
        loc: The output directory (a :class:`Location` or a URI).
        timeout_s: A lock whose heartbeat is older than this may be taken over (the larger of this
            and the holder's own ``timeout_s`` applies).
        heartbeat_s: How often the holder renews its heartbeat; less than ``timeout_s``.
        owner: Extra fields for the lock record, e.g. ``{"run_id": ..., "job": "score"}``; shown to
            a job that finds the lock held. ``run_id`` defaults to a random id.

    Raises:
        ValueError: If ``heartbeat_s`` is not positive and less than ``timeout_s``.
    """

    def __init__(
        self,
        loc: Location | str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        owner: dict[str, Any] | None = None,
    ) -> None:
        if not 0 < heartbeat_s < timeout_s:
            raise ValueError(f"need 0 < heartbeat_s < timeout_s, got heartbeat_s={heartbeat_s}, timeout_s={timeout_s}")
        self.loc = locate(loc) if isinstance(loc, str) else loc
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s)
        self.owner = dict(owner or {})
        self._store = _store_for(self.loc)
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record: dict[str, Any] | None = None
        self._version: Any = None
        self._beat_at = 0.0  # time.monotonic() of the last successful heartbeat
        self._lost_reason: str | None = None

    @property
    def uri(self) -> str:
        """The lock file (on local disk, the pattern of its generation files)."""
        return self._store.uri

    @property
    def held(self) -> bool:
        """Whether this object holds the lock (and has not noticed losing it)."""
        return self._record is not None and self._lost_reason is None

    @property
    def lost(self) -> bool:
        """Whether the heartbeat found the lock taken over (or could not renew it for ``timeout_s``)."""
        return self._lost_reason is not None

    @property
    def record(self) -> dict[str, Any] | None:
        """This holder's lock record while held."""
        return self._record

    def acquire(self) -> OutputLock:
        """Takes the lock: free, released, or stale (taken over); starts the heartbeat.

        Returns:
            self.

        Raises:
            LockHeldError: If another live job holds it; the message names that job.
            RuntimeError: If this object already holds it.
        """
        if self._record is not None:
            raise RuntimeError(f"the lock on {self.loc.uri()!r} is already held by this object")
        if not self._store.atomic:
            log.warning(
                "output %s is on a store without conditional writes (%s): its lock is best effort and "
                "exactly one writer is not guaranteed", self.loc.uri(), self.loc.protocol,
            )
        for _ in range(_CAS_ATTEMPTS):
            snap = self._store.read()
            if snap.held and not self._stale(snap):
                raise self._held_error(snap)
            record = self._new_record(previous=snap.record if snap.held else None)
            version = self._store.swap(snap.version, record)
            if version is not None:
                if snap.held:
                    log.warning("took over the lock on %s from %s: no heartbeat for %.0f s",
                                self.loc.uri(), _describe(snap.record), snap.age_s or 0)
                self._start(record, version)
                return self
            # Another job changed the lock since it was read: look again.
        raise self._held_error(self._store.read())

    def release(self) -> None:
        """Stops the heartbeat and releases the lock; does nothing if not held. Never raises for a lost lock."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            if self._record is None:
                return
            if self._lost_reason is None:
                self._release_on_store()
            else:
                log.warning("not releasing the lock on %s: %s", self.loc.uri(), self._lost_reason)
            self._record = None
            self._version = None

    def check(self) -> None:
        """Verifies on the store that this job still holds the lock; call it right before committing.

        Raises:
            LockLostError: If the lock was taken over, released, or not renewed for ``timeout_s``.
        """
        with self._mutex:
            if self._record is None:
                raise LockLostError(f"the lock on output {self.loc.uri()!r} is not held")
            if self._lost_reason is None:
                self._verify()
            if self._lost_reason is not None:
                raise LockLostError(
                    f"lost the lock on output {self.loc.uri()!r}: {self._lost_reason}; "
                    "another job may be writing there, so this job must not commit"
                )

    def __enter__(self) -> OutputLock:
        """Acquires the lock unless this object already holds it (``with OutputLock(...).acquire() as lock``)."""
        return self if self._record is not None else self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _new_record(self, previous: dict[str, Any] | None) -> dict[str, Any]:
        token = uuid.uuid4().hex
        record: dict[str, Any] = {"run_id": token[:12], "host": socket.gethostname(), "pid": os.getpid(),
                                  "user": _user(), "output": self.loc.uri()}
        record.update(self.owner)
        now = _now_iso()
        record.update(token=token, started_at=now, heartbeat_at=now, heartbeat_epoch=time.time(), beat=0,
                      timeout_s=self.timeout_s, heartbeat_s=self.heartbeat_s)
        if previous is not None:
            record["took_over_from"] = {k: previous.get(k) for k in ("run_id", "host", "pid", "started_at")}
        return record

    def _limit(self, record: dict[str, Any]) -> float:
        theirs = record.get("timeout_s")
        return max(self.timeout_s, float(theirs) if isinstance(theirs, (int, float)) else 0.0)

    def _stale(self, snap: _Snapshot) -> bool:
        return snap.age_s is None or snap.age_s > self._limit(snap.record or {})

    def _held_error(self, snap: _Snapshot) -> LockHeldError:
        record = snap.record or {}
        age = snap.age_s or 0.0
        limit = self._limit(record)
        left = max(0.0, limit - age)
        at = (datetime.now(timezone.utc) + timedelta(seconds=left)).isoformat(timespec="seconds").replace("+00:00", "Z")
        message = (
            f"output {self.loc.uri()!r} is locked by another job: {_describe(record)}; its last heartbeat "
            f"was {age:.0f} s ago, so if that job has died the lock may be taken over in {left:.0f} s "
            f"(at {at}, after {limit:.0f} s without a heartbeat). Lock file: {self._store.where(snap.version)}"
        )
        return LockHeldError(message, record, age, left)

    def _start(self, record: dict[str, Any], version: Any) -> None:
        self._record, self._version = record, version
        self._beat_at = time.monotonic()
        self._lost_reason = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mtcls-output-lock-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._beat()
            if self._lost_reason is not None:
                return

    def _beat(self) -> None:
        with self._mutex:
            if self._stop.is_set() or self._record is None:
                return
            record = dict(self._record, heartbeat_at=_now_iso(), heartbeat_epoch=time.time(),
                          beat=self._record["beat"] + 1)
            try:
                version = self._store.refresh(self._version, record)
            except Exception as exc:  # noqa: BLE001 - a flaky store: retry until the lease runs out
                self._on_beat_error(exc)
                return
            if version is None:
                self._mark_lost("another job took it over (this job's heartbeat had stopped for longer than the timeout)")
            else:
                self._record, self._version, self._beat_at = record, version, time.monotonic()

    def _on_beat_error(self, exc: Exception) -> None:
        silent = time.monotonic() - self._beat_at
        if silent > self.timeout_s:
            self._mark_lost(f"its heartbeat could not be renewed for {silent:.0f} s ({type(exc).__name__}: {exc})")
        else:
            log.warning("could not renew the lock on %s (will retry): %s: %s", self.loc.uri(), type(exc).__name__, exc)

    def _mark_lost(self, reason: str) -> None:
        self._lost_reason = reason
        log.error("lost the lock on output %s: %s", self.loc.uri(), reason)

    def _verify(self) -> None:
        snap = self._store.read()
        assert self._record is not None
        if snap.version != self._version or (snap.record or {}).get("token") != self._record["token"]:
            holder = _describe(snap.record) if snap.held else "nobody"
            self._mark_lost(f"the lock now belongs to {holder}")
        elif time.monotonic() - self._beat_at > self.timeout_s:
            self._mark_lost(f"its heartbeat was not renewed for more than {self.timeout_s:.0f} s")

    def _release_on_store(self) -> None:
        assert self._record is not None
        released = {"released": True, "released_at": _now_iso(), "token": self._record["token"],
                    "beat": self._record["beat"] + 1,
                    "released_by": {k: self._record.get(k) for k in ("run_id", "host", "pid", "started_at")}}
        try:
            if self._store.swap(self._version, released) is None:
                log.warning("the lock on %s had been taken over by another job before release", self.loc.uri())
        except Exception as exc:  # noqa: BLE001 - the lease runs out on its own
            log.warning("could not release the lock on %s (it expires after %.0f s): %s: %s",
                        self.loc.uri(), self.timeout_s, type(exc).__name__, exc)


def _describe(record: dict[str, Any] | None) -> str:
    """The holder in words: run id, host, pid, start time."""
    record = record or {}
    if record.get("unreadable"):
        return "a job whose lock record is unreadable (being written, or corrupt)"
    return (f"run {record.get('run_id', '?')} on host {record.get('host', '?')} "
            f"(pid {record.get('pid', '?')}, started {record.get('started_at', '?')})")


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return None
