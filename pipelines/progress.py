"""One progress line per job: done / total, throughput over the last minute, time left, errors.

On a terminal the line updates in place (tqdm, on stderr); otherwise (``ray job submit``, a log
file, a Ray worker) it is logged every ``every_s`` seconds (a timer thread logs it even while
nothing is committed, e.g. during a long first unit), plus once at the end. Callers feed it per
committed batch or per optimizer step, never per row, so it costs nothing measurable.

    progress = Progress("score", total=rows, unit="rows", errors="error rows")
    for batch in committed:
        progress.advance(rows_in_batch, errors=errors_in_batch)
    progress.close()

Training uses the same line (:class:`TrainingProgress`): epoch, step, loss, examples/s and the
time left in the epoch, from rank 0 only.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

#: Seconds between two logged lines when the output is not a terminal.
EVERY_S = 30.0
#: Seconds of history the rate is measured over.
WINDOW_S = 60.0


def format_seconds(seconds: Optional[float]) -> str:
    """``75 -> "1m15s"``, ``3725 -> "1h02m"``, None -> ``"?"``."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """A job's progress line.

    Args:
        label: What is progressing (``"score"``, ``"train"``), first on the line.
        total: Units to do (rows, steps).
        unit: Name of the counted units.
        rate_unit: Name of what the rate counts (default: ``unit``); see ``rated`` in :meth:`advance`.
        errors: Name of the error count shown on the line (e.g. ``"error rows"``); None: no errors shown.
        every_s: Seconds between logged lines when not on a terminal.
        window_s: The rate is measured over the last ``window_s`` seconds.
        tty: Update in place (tqdm) instead of logging; None: whether stderr is a terminal.
        logger: Where the lines go when not on a terminal.
        clock: Time source (seconds; tests pass a fake one).
        timer: Log (or redraw) from a background thread while no update comes; off for training,
            whose updates come every optimizer step.
    """

    def __init__(self, label: str, total: int, unit: str = "rows", rate_unit: Optional[str] = None,
                 errors: Optional[str] = None, every_s: float = EVERY_S, window_s: float = WINDOW_S,
                 tty: Optional[bool] = None, logger: Optional[logging.Logger] = None,
                 clock: Callable[[], float] = time.monotonic, timer: bool = True) -> None:
        self.label, self.total, self.unit = label, int(total), unit
        self.rate_unit = rate_unit or unit
        self.errors_name = errors
        self.every_s, self.window_s = every_s, window_s
        self.log = logger or log
        self.clock = clock
        self.done = self.rated = self.errors = 0
        self.status: dict[str, Any] = {}
        self.started = self.last_line = clock()
        self._samples: collections.deque = collections.deque([(self.started, 0, 0)])
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar = None
        if tty if tty is not None else _stderr_is_tty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit=f" {unit}", desc=label, file=sys.stderr, dynamic_ncols=True,
                             leave=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}{postfix}]")
        if timer:
            threading.Thread(target=self._tick, name=f"progress-{label}", daemon=True).start()

    def advance(self, n: int = 0, *, errors: int = 0, rated: Optional[int] = None,
                status: Optional[dict[str, Any]] = None) -> None:
        """Adds ``n`` done units (and ``errors``, and ``rated``: what the rate counts, default ``n``).

        Args:
            n: Units done since the last call.
            errors: Errors since the last call.
            rated: What the rate counts since the last call (default ``n``).
            status: Values shown on the line after the count (e.g. ``{"mean loss": 0.41}``),
                replacing the previous ones.
        """
        with self._lock:
            now = self.clock()
            self.done += int(n)
            self.errors += int(errors)
            self.rated += int(n if rated is None else rated)
            self.status.update(status or {})
            self._samples.append((now, self.done, self.rated))
            while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
                self._samples.popleft()
            if self._bar is not None:
                self._bar.set_postfix_str(self._tail(now), refresh=False)
                self._bar.update(int(n))
            elif now - self.last_line >= self.every_s and self.done < self.total:  # the last line is close()'s
                self._log_line(now)

    def rates(self, now: Optional[float] = None) -> tuple[Optional[float], Optional[float]]:
        """``(rate, done units per second)`` over the last ``window_s`` seconds (None before any time passed)."""
        now = self.clock() if now is None else now
        t0, done0, rated0 = self._samples[0]
        span = now - t0
        if span <= 0:
            return None, None
        return (self.rated - rated0) / span, (self.done - done0) / span

    def eta_s(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds left at the recent rate (None while nothing is measured yet)."""
        _, speed = self.rates(now)
        left = max(self.total - self.done, 0)
        if left == 0:
            return 0.0
        return left / speed if speed else None

    def line(self, now: Optional[float] = None) -> str:
        """The progress line, e.g. ``score: rows 1,200/2,000 (60%), 410.0 rows/s (last min), ETA 2s, 0 error rows``."""
        now = self.clock() if now is None else now
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.label}: {self.unit} {self.done:,}/{self.total:,} ({pct:.0f}%), {self._tail(now)}"

    def summary(self, now: Optional[float] = None) -> dict[str, Any]:
        """The figures of the line as numbers (for a manifest)."""
        now = self.clock() if now is None else now
        seconds = now - self.started
        return {self.unit: self.done, "total": self.total, "seconds": round(seconds, 3),
                f"{self.rate_unit}_per_s": round(self.rated / seconds, 3) if seconds > 0 else None,
                **({"errors": self.errors} if self.errors_name else {})}

    def close(self) -> None:
        """Ends the line: the bar's last state on a terminal, else one final logged line."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            now = self.clock()
            if self._bar is not None:
                self._bar.set_postfix_str(self._tail(now, final=True), refresh=False)
                self._bar.close()
                return
            self.log.info("%s", self.line(now) if self.done < self.total else self._final(now))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _log_line(self, now: float) -> None:
        self.last_line = now
        self.log.info("%s", self.line(now))

    def _tick(self) -> None:
        """The timer thread: a line every ``every_s`` seconds without updates (a redraw each second on a terminal)."""
        while not self._stop.wait(1.0 if self._bar is not None else min(self.every_s, 5.0)):
            with self._lock:
                if self._closed:
                    return
                now = self.clock()
                if self._bar is not None:
                    self._bar.set_postfix_str(self._tail(now), refresh=False)
                    self._bar.refresh()
                elif now - self.last_line >= self.every_s:
                    self._log_line(now)

    def _tail(self, now: float, final: bool = False) -> str:
        parts = [f"{k} {_fmt(v)}" for k, v in self.status.items()]
        if final:
            seconds = now - self.started
            parts.append(f"{self.rated / seconds:,.1f} {self.rate_unit}/s" if seconds > 0 else f"0 {self.rate_unit}/s")
            parts.append(f"in {format_seconds(seconds)}")
        else:
            rate, _ = self.rates(now)
            window = "last min" if now - self.started >= self.window_s else "so far"
            parts.append(f"{rate:,.1f} {self.rate_unit}/s ({window})" if rate is not None else f"? {self.rate_unit}/s")
            parts.append(f"ETA {format_seconds(self.eta_s(now))}")
        if self.errors_name:
            parts.append(f"{self.errors:,} {self.errors_name}")
        return ", ".join(parts)

    def _final(self, now: float) -> str:
        return f"{self.label}: {self.unit} {self.done:,}/{self.total:,} done, {self._tail(now, final=True)}"


class TrainingProgress:
    """Training's progress line (rank 0): epoch, step, mean loss, examples/s and the time left in
    the epoch, logged every ``every`` seconds; also records the training metrics (:mod:`pipelines.metrics`).

    A Ray Train worker's output is never a terminal, so the line is logged; Ray forwards it to
    the driver, e.g. ``epoch 1/2: batch 15/56 (27%), mean loss 3.1893, 493.1 examples/s (last min), ETA 1m25s``.

    Args:
        epoch: The epoch (0-based).
        epochs: Epochs in the run.
        steps: Micro-batches in the epoch on this worker.
        every: Seconds between logged lines.
        world: Workers in the run (examples/s counts all of them); None: from the Ray Train context.
        logger: Where the lines go.
    """

    def __init__(self, epoch: int, epochs: int, steps: int, every: float = EVERY_S, world: Optional[int] = None,
                 logger: Optional[logging.Logger] = None) -> None:
        self.world = max(1, world if world is not None else _train_world_size())
        self.progress = Progress(f"epoch {epoch + 1}/{epochs}", steps, unit="batch", rate_unit="examples", every_s=every,
                                 tty=False, logger=logger or logging.getLogger("pipelines.train"), timer=False)
        self._batches = self._rows = 0
        self._last = self.progress.started
        from pipelines.metrics import training_metrics

        self.metrics = training_metrics()

    def update(self, batches: int, rows: int, loss: float) -> None:
        """Takes the epoch's totals so far on this worker: micro-batches, examples and the mean loss."""
        now = self.progress.clock()
        steps, examples = batches - self._batches, rows - self._rows
        step_s = (now - self._last) / steps if steps > 0 else None
        self._batches, self._rows, self._last = batches, rows, now
        self.progress.advance(steps, rated=examples * self.world, status={"mean loss": float(loss)})
        if self.metrics is not None:
            self.metrics.record_step(loss=float(loss), examples_per_s=self.progress.rates(now)[0], step_s=step_s, steps=steps)

    def close(self) -> None:
        """Logs the epoch's last line."""
        self.progress.close()


def _train_world_size() -> int:
    try:
        import ray.train

        return int(ray.train.get_context().get_world_size())
    except Exception:  # noqa: BLE001 - outside a Ray Train worker
        return 1


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
