"""One writer per output: the output lock on local disk, on S3 (moto's server on loopback) and best effort.

Holders and contenders are real processes (forked, so they start in milliseconds); a holder is
SIGKILLed to die and SIGSTOPped to stall. Small timeouts keep the module to a few seconds.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
import uuid

import pytest

from tests.conftest import moto_s3

from pipelines.sink.lock import LockHeldError, LockLostError, OutputLock
from pipelines.storage import InputError

FORK = multiprocessing.get_context("fork")


def _hold(uris, timeout_s, heartbeat_s, ready, report, owner=None):
    """In a child: holds locks on ``uris`` until killed; reports the first lock it finds lost."""
    locks = [OutputLock(u, timeout_s=timeout_s, heartbeat_s=heartbeat_s, owner={"run_id": "doomed", **(owner or {})}).acquire()
             for u in uris]
    ready.set()
    while True:
        time.sleep(0.02)
        for lock in locks:
            if lock.lost:
                try:
                    lock.check()
                except LockLostError as exc:
                    report.put(str(exc))
                    for other in locks:
                        other.release()  # must not touch the new holders' locks
                    return


def _start_holder(uris, timeout_s, heartbeat_s, owner=None):
    ready, report = FORK.Event(), FORK.Queue()
    proc = FORK.Process(target=_hold, args=(uris, timeout_s, heartbeat_s, ready, report, owner), daemon=True)
    proc.start()
    assert ready.wait(20), "the holder did not take its locks"
    return proc, report


def _contend(uri, timeout_s, heartbeat_s, barrier, done, results):
    """In a child: one attempt at the lock after all contenders are ready; holds it until ``done``."""
    lock = OutputLock(uri, timeout_s=timeout_s, heartbeat_s=heartbeat_s)
    barrier.wait()
    try:
        lock.acquire()
    except LockHeldError as exc:
        results.put(("held", os.getpid(), exc.holder.get("pid")))
        return
    results.put(("won", os.getpid(), os.getpid()))
    done.wait(20)
    lock.release()


def _race_processes(uri, n, timeout_s, heartbeat_s):
    """``n`` processes try to take the lock at once; their (outcome, pid, holder pid) triples."""
    barrier, done, results = FORK.Barrier(n), FORK.Event(), FORK.Queue()
    procs = [FORK.Process(target=_contend, args=(uri, timeout_s, heartbeat_s, barrier, done, results), daemon=True)
             for _ in range(n)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=20) for _ in procs]
    done.set()
    for proc in procs:
        proc.join(10)
    return outcomes


def _race_threads(uri, n, timeout_s, heartbeat_s):
    """``n`` threads try to take the lock at once; the locks that won and the holders the others saw."""
    barrier, lock_guard = threading.Barrier(n), threading.Lock()
    won, seen = [], []

    def attempt():
        lock = OutputLock(uri, timeout_s=timeout_s, heartbeat_s=heartbeat_s)
        barrier.wait()
        try:
            lock.acquire()
        except LockHeldError as exc:
            with lock_guard:
                seen.append(exc.holder["token"])
            return
        with lock_guard:
            won.append(lock)

    threads = [threading.Thread(target=attempt) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    return won, seen


def _acquire_when_free(uri, timeout_s, heartbeat_s, limit_s=15.0):
    """Tries every 50 ms until the lock is taken over; the lock, and the last holder's last heartbeat (epoch s)."""
    deadline = time.monotonic() + limit_s
    last_beat = None
    while True:
        try:
            return OutputLock(uri, timeout_s=timeout_s, heartbeat_s=heartbeat_s).acquire(), last_beat
        except LockHeldError as exc:
            last_beat = time.time() - exc.age_s
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _assert_one_winner(outcomes):
    winners = [pid for outcome, pid, _ in outcomes if outcome == "won"]
    assert len(winners) == 1, outcomes
    assert all(holder == winners[0] for outcome, _, holder in outcomes if outcome == "held"), outcomes


# --- local disk ---------------------------------------------------------------------------------


def test_second_job_fails_naming_the_holder_until_release(tmp_path):
    out = str(tmp_path / "out")
    with OutputLock(out, owner={"run_id": "run-a"}) as first:
        with pytest.raises(LockHeldError) as err:
            OutputLock(out).acquire()
        message = str(err.value)
        for part in ("run run-a", f"host {socket.gethostname()}", f"pid {os.getpid()}",
                     f"started {first.record['started_at']}", "last heartbeat was 0 s ago",
                     "taken over in 120 s", "_mtcls/lock."):
            assert part in message, message
        assert isinstance(err.value, InputError)  # jobs print it as a one-line error
        assert err.value.holder["run_id"] == "run-a" and err.value.takeover_in_s > 100
        first.check()
    assert not first.held
    with OutputLock(out, owner={"run_id": "run-b"}) as second:
        second.check()
        with pytest.raises(LockHeldError, match="run run-b"):
            OutputLock(out).acquire()


def test_lock_files_stay_few_and_release_leaves_a_released_record(tmp_path):
    out = tmp_path / "out"
    for _ in range(5):
        with OutputLock(str(out)):
            pass
    names = sorted(os.listdir(out / "_mtcls"))
    assert len(names) == 2 and all(n.startswith("lock.") and n.endswith(".json") for n in names), names
    newest = max(names, key=lambda n: int(n.split(".")[1]))
    assert '"released": true' in (out / "_mtcls" / newest).read_text()


def test_timings_are_checked():
    with pytest.raises(ValueError, match="heartbeat_s"):
        OutputLock("/tmp/unused", timeout_s=10, heartbeat_s=10)


def test_killed_holder_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    out = str(tmp_path / "out")
    holder, _ = _start_holder([out], timeout_s=60, heartbeat_s=1)
    with pytest.raises(LockHeldError, match=f"pid {holder.pid}"):
        OutputLock(out, timeout_s=60, heartbeat_s=1).acquire()
    holder.kill()
    holder.join()
    started = time.time()
    with caplog.at_level(logging.WARNING, logger="pipelines.sink.lock"), OutputLock(out, timeout_s=60, heartbeat_s=1) as lock:
        assert time.time() - started < 5  # not the 60 s timeout
        assert lock.record["took_over_from"]["run_id"] == "doomed"
        lock.check()
    assert "its process is gone" in caplog.text


def test_holder_whose_pid_now_names_another_process_is_taken_over_at_once(tmp_path):
    out = str(tmp_path / "out")
    # The record names this test's own (live) pid with another start time: a reused pid.
    holder, _ = _start_holder([out], timeout_s=60, heartbeat_s=1, owner={"pid": os.getpid(), "pid_started": "1"})
    try:
        with OutputLock(out, timeout_s=60, heartbeat_s=1) as lock:
            assert lock.record["took_over_from"]["run_id"] == "doomed"
    finally:
        holder.kill()
        holder.join()


def test_killed_holder_on_another_host_is_taken_over_after_the_timeout_not_before(tmp_path):
    out = str(tmp_path / "out")
    holder, _ = _start_holder([out], timeout_s=0.6, heartbeat_s=0.1, owner={"host": "another-host"})
    time.sleep(1.0)  # longer than the timeout: only the heartbeat keeps the lock
    with pytest.raises(LockHeldError, match=f"host another-host \\(pid {holder.pid}"):
        OutputLock(out, timeout_s=0.6, heartbeat_s=0.1).acquire()

    holder.kill()
    holder.join()
    with pytest.raises(LockHeldError, match="run doomed"):
        OutputLock(out, timeout_s=0.6, heartbeat_s=0.1).acquire()
    lock, last_beat = _acquire_when_free(out, timeout_s=0.6, heartbeat_s=0.1)
    with lock:
        silent = time.time() - last_beat
        assert 0.6 < silent < 2, silent  # taken over once the heartbeat was older than the timeout
        assert lock.record["took_over_from"]["run_id"] == "doomed"
        lock.check()


def test_stalled_holder_learns_it_lost_the_lock(tmp_path):
    out = str(tmp_path / "out")
    holder, report = _start_holder([out], timeout_s=0.5, heartbeat_s=0.1)
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        lock, _ = _acquire_when_free(out, timeout_s=0.5, heartbeat_s=0.1)
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    with lock:
        message = report.get(timeout=10)
        assert "lost the lock on output" in message and "must not commit" in message
        assert f"it now belongs to run {lock.record['run_id']} on host" in message  # the new holder, named
        holder.join(10)
        time.sleep(0.3)  # the woken holder's last heartbeat and release must not have touched this lock
        lock.check()
        with pytest.raises(LockHeldError, match=f"pid {os.getpid()}"):
            OutputLock(out, timeout_s=0.5, heartbeat_s=0.1).acquire()


def test_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path):
    outs = [str(tmp_path / f"out{i}") for i in range(3)]
    holder, _ = _start_holder(outs, timeout_s=0.5, heartbeat_s=0.1)
    holder.kill()
    holder.join()
    time.sleep(0.8)  # every lock is stale now
    for out in outs:
        _assert_one_winner(_race_processes(out, 4, timeout_s=0.5, heartbeat_s=0.1))
    _assert_one_winner(_race_processes(str(tmp_path / "fresh"), 4, timeout_s=0.5, heartbeat_s=0.1))


# --- other stores -------------------------------------------------------------------------------


def test_store_without_conditional_writes_warns_best_effort(caplog):
    out = f"memory://mtcls-lock-test/{uuid.uuid4().hex}"
    with (
        caplog.at_level(logging.WARNING, logger="pipelines.sink.lock"),
        OutputLock(out, owner={"run_id": "mem"}),
        pytest.raises(LockHeldError, match="run mem"),
    ):
        OutputLock(out).acquire()
    assert "exactly one writer is not guaranteed" in caplog.text
    with OutputLock(out):
        pass


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on loopback (tests.conftest.moto_s3)."""
    import s3fs

    with moto_s3():
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("mtcls-lock-bucket")
        yield fs


def test_s3_second_job_fails_naming_the_holder_until_release(s3):
    out = "s3://mtcls-lock-bucket/scores/one"
    with OutputLock(out, owner={"run_id": "s3-a"}) as first:
        with pytest.raises(LockHeldError) as err:
            OutputLock(out).acquire()
        message = str(err.value)
        for part in ("run s3-a", f"host {socket.gethostname()}", f"pid {os.getpid()}",
                     f"started {first.record['started_at']}", "taken over in", f"{out}/_mtcls/lock.json"):
            assert part in message, message
        assert '"run_id": "s3-a"' in s3.cat("mtcls-lock-bucket/scores/one/_mtcls/lock.json").decode()
        first.check()
    assert '"released": true' in s3.cat("mtcls-lock-bucket/scores/one/_mtcls/lock.json").decode()
    with OutputLock(out, owner={"run_id": "s3-b"}) as second:
        with pytest.raises(LockHeldError, match="run s3-b"):
            OutputLock(out).acquire()
        second.check()


def test_s3_store_that_ignores_conditional_writes_is_refused(s3, monkeypatch):
    """Some S3-compatible stores ignore If-None-Match and overwrite: the lease could not keep one
    writer there, so taking it is refused, naming the output, and nothing is left behind."""
    from pipelines.storage import InputError, locate

    out = "s3://mtcls-lock-bucket/scores/unconditional"
    fs = locate(out).fs
    original = fs.call_s3

    def unconditional(method, *args, IfNoneMatch=None, **kw):  # noqa: N803 - boto3's parameter name
        return original(method, *args, **kw)

    monkeypatch.setattr(fs, "call_s3", unconditional)
    with pytest.raises(InputError, match=f"the store of '{out}' ignored a conditional write"):
        OutputLock(out).acquire()
    assert not s3.find("mtcls-lock-bucket/scores/unconditional")

    # A store that honours the condition but answers a bare 412 (no <Condition> element, as MinIO and
    # Ceph do): s3fs raises a plain OSError, which is a refused write, not a failure.
    def bare_412(method, *args, **kw):
        if kw.get("IfNoneMatch") and s3.exists(f"{kw['Bucket']}/{kw['Key']}"):
            import botocore.exceptions

            cause = botocore.exceptions.ClientError({"Error": {"Code": "PreconditionFailed"},
                                                     "ResponseMetadata": {"HTTPStatusCode": 412}}, "PutObject")
            raise OSError(22, "PreconditionFailed") from cause
        return original(method, *args, **kw)

    monkeypatch.setattr(fs, "call_s3", bare_412)
    with OutputLock("s3://mtcls-lock-bucket/scores/bare412", owner={"run_id": "bare"}) as lock:
        lock.check()


def test_s3_stalled_holder_is_taken_over_after_the_timeout_exactly_once(s3):
    # The server measures heartbeat age in whole seconds: a 2 s timeout takes over after 2 to 3 s.
    outs = [f"s3://mtcls-lock-bucket/scores/stale{i}" for i in range(3)]
    holder, report = _start_holder(outs, timeout_s=2, heartbeat_s=0.3)
    try:
        with pytest.raises(LockHeldError, match=f"pid {holder.pid}"):
            OutputLock(outs[0], timeout_s=2, heartbeat_s=0.3).acquire()
        os.kill(holder.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        with pytest.raises(LockHeldError, match="run doomed"):
            OutputLock(outs[0], timeout_s=2, heartbeat_s=0.3).acquire()
        taken, _ = _acquire_when_free(outs[0], timeout_s=2, heartbeat_s=0.3)
        waited = time.monotonic() - stopped
        assert 1 < waited < 5, waited  # the last heartbeat came at most a heartbeat or so before the stop
        assert taken.record["took_over_from"]["run_id"] == "doomed"

        time.sleep(1.0)  # the other two locks are stale too now
        for out in outs[1:]:
            won, seen = _race_threads(out, 4, timeout_s=2, heartbeat_s=0.3)
            assert len(won) == 1 and seen == [won[0].record["token"]] * 3, (won, seen)
            won[0].check()
            won[0].release()

        os.kill(holder.pid, signal.SIGCONT)
        assert "lost the lock on output" in report.get(timeout=10)
        holder.join(10)
        taken.check()  # the woken holder's heartbeat (If-Match on its old ETag) changed nothing
        taken.release()
    finally:
        if holder.is_alive():
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
