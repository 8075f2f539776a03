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
while it still runs. It notices at its next heartbeat (:attr:`OutputLock.lost`). Fencing keeps
such a job from committing anything: every lease has a token, the write tasks get a
:class:`Fence` with it and check it on the store right before each file moves into place, and the
driver calls :meth:`OutputLock.check` before every delete, the manifest and ``_SUCCESS``.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from pipelines.sink.lock_stores import Snapshot, check_conditional_writes, now_iso, store_for
from pipelines.storage import InputError, Location, locate, redact_uri

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
DEFAULT_HEARTBEAT_S = 15.0
_CAS_ATTEMPTS = 5  # re-reads after a lost compare-and-swap before giving up


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


class LockLostError(RuntimeError):
    """This job's lock on its output was taken over by another job: it must not commit (a failure, not a bad input)."""


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
        self._shown = redact_uri(self.loc.uri())  # the output as messages and records name it
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s)
        self.owner = dict(owner or {})
        self._store = store_for(self.loc)
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
            InputError: An S3 store that ignores conditional writes (the lease relies on them).
            RuntimeError: If this object already holds it.
        """
        if self._record is not None:
            raise RuntimeError(f"the lock on {self._shown!r} is already held by this object")
        check_conditional_writes(self.loc, "The output's lease (one writer at a time)")
        if not self._store.atomic:
            log.warning(
                "output %s is on a store without conditional writes (%s): its lock is best effort and "
                "exactly one writer is not guaranteed", self._shown, self.loc.protocol,
            )
        for _ in range(_CAS_ATTEMPTS):
            snap = self._store.read()
            if snap.held and not self._stale(snap):
                raise self._held_error(snap)
            record = self._new_record(previous=snap.record if snap.held else None)
            version = self._store.swap(snap.version, record)
            if version is not None:
                if snap.held:
                    why = ("its process is gone" if _dead_here(snap.record or {})
                           else f"no heartbeat for {snap.age_s or 0:.0f} s")
                    log.warning("took over the lock on %s from %s: %s", self._shown, _describe(snap.record), why)
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
                log.warning("not releasing the lock on %s: %s", self._shown, self._lost_reason)
            self._record = None
            self._version = None

    def check(self) -> None:
        """Verifies on the store that this job still holds the lock; call it right before committing.

        Raises:
            LockLostError: If the lock was taken over, released, or not renewed for ``timeout_s``.
        """
        with self._mutex:
            if self._record is None:
                raise LockLostError(f"the lock on output {self._shown!r} is not held")
            if self._lost_reason is None:
                self._verify()
            if self._lost_reason is not None:
                raise LockLostError(
                    f"lost the lock on output {self._shown!r}: {self._lost_reason}; "
                    "another job may be writing there, so this job must not commit"
                )

    def fence(self) -> "Fence":
        """The fencing token of this lease, for the tasks that commit on this job's behalf.

        Raises:
            LockLostError: If the lock is not held.
        """
        if self._record is None:
            raise LockLostError(f"the lock on output {self._shown!r} is not held")
        return Fence(self.loc, self._record["token"])

    def __enter__(self) -> OutputLock:
        """Acquires the lock unless this object already holds it (``with OutputLock(...).acquire() as lock``)."""
        return self if self._record is not None else self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _new_record(self, previous: dict[str, Any] | None) -> dict[str, Any]:
        token = uuid.uuid4().hex
        record: dict[str, Any] = {"run_id": token[:12], "host": socket.gethostname(), "boot_id": _boot_id(),
                                  "pid": os.getpid(), "pid_started": _process_start(os.getpid()),
                                  "user": _user(), "output": self._shown}
        record.update(self.owner)
        now = now_iso()
        record.update(token=token, started_at=now, heartbeat_at=now, heartbeat_epoch=time.time(), beat=0,
                      timeout_s=self.timeout_s, heartbeat_s=self.heartbeat_s)
        if previous is not None:
            record["took_over_from"] = {k: previous.get(k) for k in ("run_id", "host", "pid", "started_at")}
        return record

    def _limit(self, record: dict[str, Any]) -> float:
        theirs = record.get("timeout_s")
        return max(self.timeout_s, float(theirs) if isinstance(theirs, (int, float)) else 0.0)

    def _stale(self, snap: Snapshot) -> bool:
        return snap.age_s is None or snap.age_s > self._limit(snap.record or {}) or _dead_here(snap.record or {})

    def _held_error(self, snap: Snapshot) -> LockHeldError:
        record = snap.record or {}
        age = snap.age_s or 0.0
        limit = self._limit(record)
        left = max(0.0, limit - age)
        at = (datetime.now(timezone.utc) + timedelta(seconds=left)).isoformat(timespec="seconds").replace("+00:00", "Z")
        message = (
            f"output {self._shown!r} is locked by another job: {_describe(record)}; its last heartbeat "
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
            record = dict(self._record, heartbeat_at=now_iso(), heartbeat_epoch=time.time(),
                          beat=self._record["beat"] + 1)
            try:
                version = self._store.refresh(self._version, record)
            except Exception as exc:  # noqa: BLE001 - a flaky store: retry until the lease runs out
                self._on_beat_error(exc)
                return
            if version is None:
                self._mark_lost(f"it now belongs to {_holder(self._store.read())} (this job's heartbeat had stopped "
                                "for longer than the timeout)")
            else:
                self._record, self._version, self._beat_at = record, version, time.monotonic()

    def _on_beat_error(self, exc: Exception) -> None:
        silent = time.monotonic() - self._beat_at
        if silent > self.timeout_s:
            self._mark_lost(f"its heartbeat could not be renewed for {silent:.0f} s ({type(exc).__name__}: {exc})")
        else:
            log.warning("could not renew the lock on %s (will retry): %s: %s", self._shown, type(exc).__name__, exc)

    def _mark_lost(self, reason: str) -> None:
        self._lost_reason = reason
        log.error("lost the lock on output %s: %s", self._shown, reason)

    def _verify(self) -> None:
        snap = self._store.read()
        assert self._record is not None
        if snap.version != self._version or (snap.record or {}).get("token") != self._record["token"]:
            self._mark_lost(f"it now belongs to {_holder(snap)}")
        elif time.monotonic() - self._beat_at > self.timeout_s:
            self._mark_lost(f"its heartbeat was not renewed for more than {self.timeout_s:.0f} s")

    def _release_on_store(self) -> None:
        assert self._record is not None
        released = {"released": True, "released_at": now_iso(), "token": self._record["token"],
                    "beat": self._record["beat"] + 1,
                    "released_by": {k: self._record.get(k) for k in ("run_id", "host", "pid", "started_at")}}
        try:
            if self._store.swap(self._version, released) is None:
                log.warning("the lock on %s had been taken over by another job before release", self._shown)
        except Exception as exc:  # noqa: BLE001 - the lease runs out on its own
            log.warning("could not release the lock on %s (it expires after %.0f s): %s: %s",
                        self._shown, self.timeout_s, type(exc).__name__, exc)


@dataclass(frozen=True)
class Fence:
    """A lease's fencing token: whoever commits for a job checks it on the store first.

    Picklable, so Ray tasks carry it. :meth:`check` costs one read of the lock (a directory
    listing and a small file locally, one GET on S3).

    Attributes:
        loc: The output.
        token: The lease's token (:attr:`OutputLock.record`).
    """

    loc: Location
    token: str

    def check(self) -> None:
        """Raises :class:`LockLostError` naming the new holder unless the lease is still this one."""
        snap = store_for(self.loc).read()
        if not snap.held or (snap.record or {}).get("token") != self.token:
            raise LockLostError(f"lost the lock on output {redact_uri(self.loc.uri())!r}: it now belongs to {_holder(snap)}; "
                                "this job must not commit")


def _boot_id() -> Optional[str]:
    """This boot of this machine (pids are only comparable within one)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> Optional[str]:
    """When a process started, in clock ticks since boot (``/proc/<pid>/stat`` field 22); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def _dead_here(record: dict[str, Any]) -> bool:
    """Whether the holder ran on this host in this boot and its process no longer runs."""
    boot, pid, started = record.get("boot_id"), record.get("pid"), record.get("pid_started")
    if record.get("host") != socket.gethostname() or not boot or boot != _boot_id() or not isinstance(pid, int) or not started:
        return False
    return _process_start(pid) != started


def _holder(snap: Snapshot) -> str:
    """Who holds the lock now, in words; a released lock names the job that released it."""
    record = snap.record or {}
    if snap.held:
        return _describe(record)
    if record.get("released_by"):
        return f"nobody: it was released by {_describe(record['released_by'])}"
    return "nobody"


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
