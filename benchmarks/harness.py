"""What the benchmark scripts share: data paths, corpora and models, timers and samplers, the
machine description, JSON output, scoring-job runs and jobs run in a subprocess.

The scripts are modules of the ``benchmarks`` package, run from the repository root:
``python -m benchmarks.score_throughput``. Each prints JSON. This module imports torch, Ray and
the pipelines only inside the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: The shared data sets (GoEmotions, OLID), next to the checkout.
DATA = ROOT.parent / "shared" / "data"
GOEMOTIONS = DATA / "goemotions"
#: Test split and text column per data set.
TEST_SETS = {"olid": (DATA / "olid" / "test.parquet", "tweet"), "goemotions": (GOEMOTIONS / "test.parquet", "text")}
#: The 3 heads of the scoring benchmarks (GoEmotions-shaped: 28- and 7-label multilabel, 4-class).
HEADS = [
    {"name": "emotions", "kind": "multilabel", "labels": [f"e{i}" for i in range(28)]},
    {"name": "ekman", "kind": "multilabel", "labels": ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]},
    {"name": "sentiment", "kind": "multiclass", "labels": ["positive", "negative", "ambiguous", "neutral"]},
]


# Command line and output


def parser(doc: str) -> argparse.ArgumentParser:
    """The argument parser of a benchmark script, its ``--help`` led by the module docstring ``doc``, as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def print_json(document: Any, indent: int | None = 2) -> None:
    """Prints ``document`` as JSON on stdout and flushes.

    Args:
        document: Anything ``json.dumps`` takes.
        indent: As in ``json.dumps``; None prints one line.
    """
    print(json.dumps(document, indent=indent), flush=True)


def skip(reason: str) -> None:
    """Prints the one-line ``{"skipped": reason}`` a script prints when its data or models are missing."""
    print_json({"skipped": reason}, indent=None)


def machine(*fields: str) -> dict[str, Any]:
    """The machine description a script records next to its figures.

    Args:
        *fields: Which entries, in this order: ``gpus`` (CUDA device names), ``cpus``,
            ``processor``, ``native_bf16`` (the CPU computes bf16 natively), ``torch``, ``ray``,
            ``cuda`` (the first CUDA device's name, or None). None given: ``cpus``, ``processor``,
            ``torch``, ``ray``, ``cuda``.

    Returns:
        ``{field: value}``.

    Raises:
        ValueError: An unknown field.
    """
    return {field: _machine_value(field) for field in fields or ("cpus", "processor", "torch", "ray", "cuda")}


def _machine_value(field: str) -> Any:
    if field == "cpus":
        return os.cpu_count()
    if field == "processor":
        return platform.processor() or platform.machine()
    if field == "ray":
        import ray

        return ray.__version__
    if field == "native_bf16":
        from mtcls.precision import cpu_native_bf16

        return cpu_native_bf16()
    import torch

    if field == "torch":
        return torch.__version__
    if field == "cuda":
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if field == "gpus":
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    raise ValueError(f"unknown machine field {field!r}")


# Timing and sampling


def process_ids() -> list[int]:
    """The ids of the live processes (from ``/proc``)."""
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit()]


class Timer:
    """Wall-clock seconds of a ``with`` block (``perf_counter``), in ``seconds`` once it ends."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


class Sampler:
    """Calls :meth:`sample` every ``interval`` seconds in a thread, between ``__enter__`` and ``__exit__``."""

    interval = 0.25

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        """Takes one sample."""
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class RssSampler(Sampler):
    """Peak summed RSS (bytes, in ``peak``) of the Ray processes (workers, raylet, GCS) and this process."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def sample(self) -> None:
        """Adds up the RSS of every process whose command line names Ray, and this one's."""
        total = 0
        for pid in process_ids():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if pid != os.getpid() and b"ray" not in cmd:
                    continue
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except (OSError, ValueError):
                continue
        self.peak = max(self.peak, total)


def rss_anon_mb() -> float:
    """This process's private resident memory (``RssAnon``), MiB; NaN where ``/proc`` does not say."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RssAnonSampler(Sampler):
    """Peak growth of this process's private memory over its level when the sampler was made.

    Pages of Ray's shared-memory object store are not private to the process, so they do not count.
    After the ``with`` block, ``growth_mb`` is the peak (sampled every 20 ms and once at the end)
    minus ``before_mb``.
    """

    interval = 0.02

    def __init__(self) -> None:
        super().__init__()
        self.before_mb = self.peak_mb = rss_anon_mb()

    def sample(self) -> None:
        """Reads ``RssAnon`` once."""
        self.peak_mb = max(self.peak_mb, rss_anon_mb())

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.sample()

    @property
    def growth_mb(self) -> float:
        """Peak minus the level before, MiB."""
        return self.peak_mb - self.before_mb


class GpuSampler(Sampler):
    """``nvidia-smi`` utilisation of every GPU, sampled in a thread; no samples where there is no ``nvidia-smi``."""

    interval = 0.2

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[list[float]] = []
        self.available = shutil.which("nvidia-smi") is not None

    def sample(self) -> None:
        """One ``nvidia-smi`` query: a percentage per GPU."""
        if not self.available:
            return
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
        try:
            if out.returncode == 0:
                self.samples.append([float(v) for v in out.stdout.split()])
        except ValueError:  # "[N/A]" (MIG): no figure
            self.available = False

    def summary(self) -> dict | None:
        """Mean utilisation per GPU over every sample and over the middle 80% of them; None without samples."""
        if not self.samples:
            return None
        k = len(self.samples) // 10
        middle = self.samples[k:len(self.samples) - k] or self.samples
        per_gpu = list(zip(*self.samples))
        return {"samples": len(self.samples), "mean_percent_per_gpu": [round(statistics.fmean(g), 1) for g in per_gpu],
                "middle_80pct_mean_percent_per_gpu": [round(statistics.fmean(g), 1) for g in zip(*middle)]}


def cpu_seconds_by_process() -> dict[str, float]:
    """User + system CPU seconds of every live process, keyed ``"<pid> <command line, cut>"``."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in process_ids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        out[f"{pid} {command[:70]}"] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def cpu_used_during(before: dict[str, float], after: dict[str, float], top: int = 8) -> dict:
    """Where the CPU went between two :func:`cpu_seconds_by_process` snapshots: the busiest processes, the rest summed."""
    used = sorted(((after[k] - before.get(k, 0.0), k) for k in after), reverse=True)
    return {"total_s": round(sum(u for u, _ in used), 2),
            "top": {k: round(u, 2) for u, k in used[:top]}, "others_s": round(sum(u for u, _ in used[top:]), 2)}


# Corpora and models


def corpus_texts(data: Path) -> list[str] | None:
    """The ``text`` column of ``data``; None, after printing a JSON "skipped" line, when it is missing."""
    if not data.is_file():
        skip(f"{data} not found (needs ../shared/data)")
        return None
    import pyarrow.parquet as pq

    return pq.read_table(data, columns=["text"]).column("text").to_pylist()


def repeat_to(texts: list[str], rows: int) -> list[str]:
    """``texts`` cycled (or cut) to exactly ``rows`` items."""
    return (texts * (rows // len(texts) + 1))[:rows]


def write_corpus(texts: list[str], target: Path, rows_per_file: int = 4000) -> None:
    """Writes ``texts`` as a scoring input: Parquet files of ``id`` (``r<row>``) and ``text``, row groups of 1,024.

    Args:
        texts: One row each.
        target: A directory that does not exist yet.
        rows_per_file: Rows per file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    target.mkdir(parents=True)
    for k, start in enumerate(range(0, len(texts), rows_per_file)):
        chunk = texts[start : start + rows_per_file]
        table = pa.table({"id": [f"r{start + i}" for i in range(len(chunk))], "text": chunk})
        pq.write_table(table, target / f"part-{k:04d}.parquet", row_group_size=1024)


def save_model(model, tokenizer, target: Path) -> Path:
    """Saves ``model`` and ``tokenizer`` into ``target`` (a model directory the jobs load); returns ``target``."""
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def tiny_model(tokenizer):
    """A near-zero-cost encoder (BERT, 1 layer, hidden 32; seed 0) with :data:`HEADS`, for ``tokenizer``'s vocabulary."""
    import torch
    from transformers import BertConfig

    import mtcls

    torch.manual_seed(0)
    encoder = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)
    return mtcls.MultiTaskModel(mtcls.MultiTaskConfig(encoder=encoder, heads=HEADS)).eval()


def minilm_model():
    """The packaged all-MiniLM-L6-v2 with :data:`HEADS` (heads initialised with seed 0), in eval mode."""
    import torch

    import mtcls

    torch.manual_seed(0)
    return mtcls.MultiTaskModel.from_encoder(mtcls.default_encoder_path(), HEADS).eval()


def decisions(spec, probs):
    """One comparable decision per row (a 2-d array): the label index, or the packed label set (multilabel)."""
    import numpy as np

    import mtcls

    picked = np.asarray(mtcls.predict_indices(spec, probs))
    return picked.reshape(len(picked), -1)


def train_config(dataset: str, overrides: Sequence[str] = ()):
    """The shipped ``jobs/configs/train/<dataset>.yaml`` as a ``TrainConfig``, with ``key=value`` overrides."""
    from pipelines.config import load_config
    from pipelines.train import TrainConfig

    return load_config(TrainConfig, ROOT / f"jobs/configs/train/{dataset}.yaml", list(overrides))


# Ray and the scoring job


def start_ray(**init_args: Any):
    """Starts a local Ray for a benchmark: no dashboard, workers' logs not forwarded, no auth token.

    Args:
        **init_args: More ``ray.init`` arguments (``num_gpus`` ...).

    Returns:
        The ``ray`` module.
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, **init_args)
    return ray


def bench_job(corpus: Path, model_dir: Path, out: Path, **overrides: Any) -> dict:
    """One scoring job over ``corpus`` into ``out`` (overwritten), timed and with the Ray processes' peak RSS.

    Args:
        corpus: Input directory.
        model_dir: Saved model directory.
        out: Output directory.
        **overrides: More ``ScoreConfig`` keys; ``precision`` defaults to fp32, as the bare-forward
            comparisons are at fp32 (``auto`` is bf16 on some CPUs).

    Returns:
        ``rows`` (written), ``seconds``, ``peak_rss_mb`` and ``errors`` (rows with an error).
    """
    from pipelines.score import ScoreConfig, run_score

    overrides.setdefault("precision", "fp32")
    cfg = ScoreConfig(input=str(corpus), output=str(out), model=str(model_dir), progress=False, overwrite=True, **overrides)
    with RssSampler() as rss, Timer() as timer:
        manifest = run_score(cfg)
    return {"rows": manifest["rows_out"], "seconds": timer.seconds, "peak_rss_mb": rss.peak / 2**20,
            "errors": manifest["rows_error"]}


def steady(small: dict, large: dict) -> float:
    """Steady-state rows/s: the larger :func:`bench_job` run's extra rows over its extra seconds (start-up cancels out)."""
    return (large["rows"] - small["rows"]) / (large["seconds"] - small["seconds"])


def warm_up_workers(texts: list[str], model_dir: Path, work: Path, rows: int = 2000, **overrides: Any) -> None:
    """A throwaway scoring job of ``rows`` rows under ``work``.

    The first job of a Ray session also starts its workers (they import torch and transformers),
    which would slow only the next run and inflate every steady-state figure taken from it.

    Args:
        texts: Texts, cycled to ``rows``.
        model_dir: Saved model directory.
        work: Where the corpus (``warm``) and the output (``warm_out``) go; not inside a model directory.
        rows: Rows of the run.
        **overrides: ``ScoreConfig`` keys, as for :func:`bench_job`; the input files have
            ``rows_per_file`` rows (4,000 without it).
    """
    write_corpus(repeat_to(texts, rows), work / "warm", rows_per_file=overrides.get("rows_per_file", 4000))
    bench_job(work / "warm", model_dir, work / "warm_out", **overrides)


def forward_rows_per_s(engine, tokens) -> float:
    """Rows/s of ``engine.predict_tokens(tokens)`` after a 64-row warm-up call (kernels; int8's first quantized call)."""
    engine.predict_tokens(tokens.rows()[:64])
    with Timer() as timer:
        engine.predict_tokens(tokens)
    return len(tokens) / timer.seconds


# Jobs in a subprocess


def run_module(module: str, args: Sequence[str], result: Path, name: str) -> dict:
    """Runs ``python -m <module> <args>`` from the repository root and returns the JSON document it wrote.

    The process reports through a file, not its logs: ``result`` is where it writes its JSON.

    Args:
        module: Module to run (``jobs.train``, a benchmark's own child mode ...).
        args: Its command-line arguments.
        result: The JSON file the process writes.
        name: What the run is called in the error.

    Returns:
        The parsed ``result``.

    Raises:
        SystemExit: The process failed (with the end of its stderr).
    """
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def train_job(output: Path, overrides: Sequence[str], storage_path: Path, config: str | None = None) -> dict:
    """Runs the training job (``python -m jobs.train``) in its own process; returns its training summary.

    Each run gets a fresh process (and Ray), so runs do not share warm caches or memory.

    Args:
        output: The model directory it exports; the summary is read from
            ``<output>/training_summary.json``. Its name names the run in errors.
        overrides: ``key=value`` training keys.
        storage_path: Ray Train's storage (checkpoints).
        config: A training YAML (relative to the repository root), or None.

    Returns:
        The job's ``training_summary.json``.
    """
    args = [*(["--config", config] if config else []), *overrides, f"output={output}", f"storage_path={storage_path}"]
    return run_module("jobs.train", args, output / "training_summary.json", output.name)
