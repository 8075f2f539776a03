"""Job metrics through ``ray.util.metrics``: on the Ray dashboard and its Prometheus endpoint.

Ray exports each metric with a ``ray_`` prefix (a counter also gets ``_total``), e.g.
``ray_mtcls_score_rows_committed_total{job="score",output="s3://bucket/scores"}``.

Where each figure is recorded, so that none costs per-row Python work:

- the inference actor, once per block (:class:`ScoringBlockMetrics`): rows scored and errored,
  tokens and padded token slots (the padding fraction), the block's latency, GPU memory, and per
  head the mean top probability;
- the driver, once per committed write batch (:class:`CommitMetrics`): rows, error rows and files
  committed, rows still pending, rows/s over the last minute;
- rank 0 of training, once per optimizer step (:class:`TrainingMetrics`): loss, examples/s, step time.

Each inference actor also keeps its running totals in Ray's key-value store (one small write per
block, no extra process), which the driver adds up into the manifest's ``metrics`` section
(:func:`collect_scoring_stats`). Recording never fails a job: a metric that cannot be recorded (no
Ray, metrics disabled) is dropped with one debug line.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import numpy as np

log = logging.getLogger(__name__)

#: Tags of scoring metrics; per-head metrics add ``head``.
SCORE_TAGS = ("job", "output")
HEAD_TAGS = ("job", "output", "head")
TRAIN_TAGS = ("job",)
#: Histogram buckets (seconds) of one actor call (a block of ``block_rows`` rows) and of one optimizer step.
BLOCK_SECONDS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300]
STEP_SECONDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

_DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...], Optional[list[float]]]] = {
    # name: (kind, description, tag keys, histogram boundaries)
    "mtcls_score_rows_scored": ("counter", "Rows the inference actors scored (a retried block counts again).", SCORE_TAGS, None),
    "mtcls_score_rows_errored": ("counter", "Rows the inference actors returned with an error.", SCORE_TAGS, None),
    "mtcls_score_tokens": ("counter", "Token ids run through the encoder (without padding).", SCORE_TAGS, None),
    "mtcls_score_padded_tokens": ("counter", "Token slots run through the encoder, padding included.", SCORE_TAGS, None),
    "mtcls_score_padding_fraction": ("gauge", "Share of padding in the token slots of the last block.", SCORE_TAGS, None),
    "mtcls_score_block_seconds": ("histogram", "Seconds of one inference actor call (one block).", SCORE_TAGS, BLOCK_SECONDS),
    "mtcls_score_gpu_memory_bytes": ("gauge", "Peak GPU memory torch allocated in the inference actor.", SCORE_TAGS, None),
    "mtcls_score_mean_top_probability": ("gauge", "Per head, the mean over the last block's scored rows of each "
                                         "row's largest probability (binary: the positive one).", HEAD_TAGS, None),
    "mtcls_score_rows_committed": ("counter", "Rows committed to the output.", SCORE_TAGS, None),
    "mtcls_score_error_rows_committed": ("counter", "Committed rows that carry an error.", SCORE_TAGS, None),
    "mtcls_score_files_committed": ("counter", "Output files committed.", SCORE_TAGS, None),
    "mtcls_score_rows_pending": ("gauge", "Rows of this run not yet committed.", SCORE_TAGS, None),
    "mtcls_score_rows_per_second": ("gauge", "Rows committed per second over the last minute.", SCORE_TAGS, None),
    "mtcls_train_loss": ("gauge", "Mean training loss of the epoch so far (rank 0).", TRAIN_TAGS, None),
    "mtcls_train_examples_per_second": ("gauge", "Training examples per second over the last minute, all workers.", TRAIN_TAGS, None),
    "mtcls_train_step_seconds": ("histogram", "Seconds per micro-batch step (rank 0).", TRAIN_TAGS, STEP_SECONDS),
    "mtcls_train_steps": ("counter", "Micro-batch steps done (rank 0).", TRAIN_TAGS, None),
}

_METRICS: dict[str, Any] = {}
_BROKEN = False


def _metric(name: str) -> Any:
    """The process's metric object of ``name`` (made once per process), or None without Ray."""
    global _BROKEN
    if _BROKEN:
        return None
    if name not in _METRICS:
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():
                return None
            kind, description, tags, boundaries = _DEFINITIONS[name]
            if kind == "counter":
                _METRICS[name] = metrics.Counter(name, description=description, tag_keys=tags)
            elif kind == "gauge":
                _METRICS[name] = metrics.Gauge(name, description=description, tag_keys=tags)
            else:
                _METRICS[name] = metrics.Histogram(name, description=description, boundaries=boundaries, tag_keys=tags)
        except Exception as exc:  # noqa: BLE001 - metrics never fail a job
            log.debug("metrics off in this process: %s", exc)
            _BROKEN = True
            return None
    return _METRICS[name]


def record(name: str, value: Optional[float], tags: dict[str, str]) -> None:
    """Records ``value`` on the metric ``name`` (a counter adds it; zero, None and NaN are skipped for counters)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return
    metric = _metric(name)
    if metric is None:
        return
    kind = _DEFINITIONS[name][0]
    try:
        if kind == "counter":
            if value > 0:
                metric.inc(value, tags=tags)
        elif kind == "gauge":
            metric.set(value, tags=tags)
        else:
            metric.observe(value, tags=tags)
    except Exception as exc:  # noqa: BLE001
        log.debug("metric %s not recorded: %s", name, exc)


def score_tags(job: str, output: str) -> dict[str, str]:
    """The tags of a scoring run's metrics."""
    return {"job": job, "output": output}


#: Namespace of the actors' per-run totals in Ray's key-value store (GCS).
STATS_NAMESPACE = "mtcls_scoring_stats"
_SUMMED = ("blocks", "rows_scored", "rows_errored", "tokens", "padded_tokens", "block_seconds_sum")


def new_stats_key() -> str:
    """A fresh key prefix under which one run's inference actors keep their totals."""
    import uuid

    return f"run-{uuid.uuid4().hex}/"


def collect_scoring_stats(prefix: Optional[str]) -> dict[str, Any]:
    """Adds up the totals the run's inference actors left under ``prefix``, then removes them.

    Each actor (a restarted one under a new key) rewrites its running totals after every block,
    before it returns the block, so everything the driver has seen committed is counted; a block
    scored twice (a retried task) counts twice.

    Returns:
        ``blocks``, ``rows_scored``, ``rows_errored``, ``tokens``, ``padded_tokens``,
        ``padding_fraction``, ``block_seconds_mean``, ``block_seconds_max``,
        ``gpu_memory_max_bytes`` (None without a GPU); empty if the store cannot be read.
    """
    if prefix is None:
        return {}
    import json

    try:
        from ray.experimental import internal_kv as kv

        keys = kv._internal_kv_list(prefix, namespace=STATS_NAMESPACE)
        parts = [json.loads(kv._internal_kv_get(k, namespace=STATS_NAMESPACE)) for k in keys]
        kv._internal_kv_del(prefix, del_by_prefix=True, namespace=STATS_NAMESPACE)
    except Exception as exc:  # noqa: BLE001 - metrics never fail a job
        log.warning("the inference actors' figures are unavailable (%s): the manifest's metrics lack them", exc)
        return {}
    t = {k: sum(p.get(k, 0) for p in parts) for k in _SUMMED}
    gpu = [p["gpu_memory_max_bytes"] for p in parts if p.get("gpu_memory_max_bytes") is not None]
    return {**{k: int(t[k]) for k in _SUMMED if k != "block_seconds_sum"},
            "padding_fraction": round(1 - t["tokens"] / t["padded_tokens"], 4) if t["padded_tokens"] else None,
            "block_seconds_mean": round(t["block_seconds_sum"] / t["blocks"], 4) if t["blocks"] else None,
            "block_seconds_max": round(max((p.get("block_seconds_max", 0.0) for p in parts), default=0.0), 4),
            "gpu_memory_max_bytes": max(gpu) if gpu else None}


class ScoringBlockMetrics:
    """What an inference actor records per block: metrics, and its running totals for the manifest.

    Args:
        tags: :func:`score_tags` of the run.
        stats_key: :func:`new_stats_key` of the run: the totals go to Ray's key-value store under
            it (read by :func:`collect_scoring_stats`); None: metrics only.
    """

    def __init__(self, tags: dict[str, str], stats_key: Optional[str] = None) -> None:
        import uuid

        self.tags = tags
        self.key = f"{stats_key}{uuid.uuid4().hex}" if stats_key else None
        self.totals: dict[str, Any] = {**{k: 0 for k in _SUMMED}, "block_seconds_max": 0.0, "gpu_memory_max_bytes": None}
        self._head_tags: dict[str, dict[str, str]] = {}

    def record(self, seconds: float, scored: int, errored: int, tokens: int, padded_tokens: int,
               probs: dict[str, np.ndarray], device: Any = None) -> None:
        """Records one block.

        Args:
            seconds: The actor call's wall time.
            scored: Rows with predictions.
            errored: Rows with an error.
            tokens: Token ids the encoder ran on (0: heads only).
            padded_tokens: Token slots of the forward batches, padding included.
            probs: ``{head: probabilities of the scored rows}``.
            device: The engine's torch device (GPU memory is read on CUDA).
        """
        tags = self.tags
        record("mtcls_score_rows_scored", scored, tags)
        record("mtcls_score_rows_errored", errored, tags)
        record("mtcls_score_tokens", tokens, tags)
        record("mtcls_score_padded_tokens", padded_tokens, tags)
        if padded_tokens:
            record("mtcls_score_padding_fraction", 1.0 - tokens / padded_tokens, tags)
        record("mtcls_score_block_seconds", seconds, tags)
        gpu = None
        if device is not None and getattr(device, "type", None) == "cuda":
            import torch

            gpu = int(torch.cuda.max_memory_allocated(device))
            record("mtcls_score_gpu_memory_bytes", gpu, tags)
        for head, values in probs.items():
            if len(values):
                if head not in self._head_tags:
                    self._head_tags[head] = {**tags, "head": head}
                top = float(np.nanmean(values.reshape(len(values), -1).max(axis=1)))
                record("mtcls_score_mean_top_probability", top, self._head_tags[head])
        if self.key is not None:
            t = self.totals
            for k, v in (("blocks", 1), ("rows_scored", scored), ("rows_errored", errored), ("tokens", tokens),
                         ("padded_tokens", padded_tokens), ("block_seconds_sum", seconds)):
                t[k] += v
            t["block_seconds_max"] = max(t["block_seconds_max"], seconds)
            if gpu is not None:
                t["gpu_memory_max_bytes"] = max(t["gpu_memory_max_bytes"] or 0, gpu)
            self._store()

    def _store(self) -> None:
        import json

        try:
            from ray.experimental import internal_kv as kv

            kv._internal_kv_put(self.key, json.dumps(self.totals), overwrite=True, namespace=STATS_NAMESPACE)
        except Exception as exc:  # noqa: BLE001
            log.debug("scoring totals not stored: %s", exc)
            self.key = None


class CommitMetrics:
    """What the scoring driver records per committed write batch, and the totals for the manifest.

    Args:
        tags: :func:`score_tags` of the run.
        pending: Rows this run has to commit.
    """

    def __init__(self, tags: dict[str, str], pending: int) -> None:
        self.tags, self.pending = tags, pending
        self.rows = self.errors = self.files = 0
        record("mtcls_score_rows_pending", pending, tags)

    def record(self, rows: int, errors: int, files: int, rows_per_s: Optional[float]) -> None:
        """Records one committed batch: its rows, error rows and files, and the recent rate."""
        self.rows += rows
        self.errors += errors
        self.files += files
        record("mtcls_score_rows_committed", rows, self.tags)
        record("mtcls_score_error_rows_committed", errors, self.tags)
        record("mtcls_score_files_committed", files, self.tags)
        record("mtcls_score_rows_pending", max(self.pending - self.rows, 0), self.tags)
        record("mtcls_score_rows_per_second", rows_per_s, self.tags)

    def summary(self) -> dict[str, Any]:
        """The driver's totals."""
        return {"rows_committed": self.rows, "error_rows_committed": self.errors, "files_committed": self.files}


class TrainingMetrics:
    """What rank 0 of training records per optimizer step."""

    def __init__(self, tags: dict[str, str]) -> None:
        self.tags = tags

    def record_step(self, loss: Optional[float], examples_per_s: Optional[float], step_s: Optional[float], steps: int) -> None:
        """Records one optimizer step (``steps`` micro-batches, ``step_s`` seconds each)."""
        record("mtcls_train_loss", loss, self.tags)
        record("mtcls_train_examples_per_second", examples_per_s, self.tags)
        record("mtcls_train_step_seconds", step_s, self.tags)
        record("mtcls_train_steps", steps, self.tags)


def training_metrics(job: str = "train") -> Optional[TrainingMetrics]:
    """The training metrics of this process (None without Ray)."""
    return TrainingMetrics({"job": job}) if _metric("mtcls_train_loss") is not None else None
