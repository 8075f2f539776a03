"""Scoring throughput and memory, all in one run on one machine, printed as JSON.

    python benchmarks/score_throughput.py [--rows 4000] [--data ../shared/data/goemotions/train.parquet]

Measures, on the same GoEmotions texts with all-MiniLM-L6-v2 + 3 heads and max 128 tokens:
  (a) the scoring job (pipelines.scoring.run_scoring on a local Ray), steady state: the extra time of
      a 10x run over a 1x run, so start-up (actor creation, model load) cancels out; end-to-end
      rates including start-up are reported too;
  (b) the bare model forward on pre-tokenized, length-sorted batches of 64 (the limit);
  (c) one transformers pipeline("text-classification") per head, what users of single-task models do;
and the peak resident memory of all Ray processes during the 1x and 10x runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mtcls  # noqa: E402
from pipelines.score import ScoreConfig, run_score  # noqa: E402

HEADS = [
    {"name": "emotions", "kind": "multilabel", "labels": [f"e{i}" for i in range(28)]},
    {"name": "ekman", "kind": "multilabel", "labels": ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]},
    {"name": "sentiment", "kind": "multiclass", "labels": ["positive", "negative", "ambiguous", "neutral"]},
]


class RssSampler:
    """Peak summed RSS of the Ray processes (workers, raylet, GCS) and this driver."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if int(pid) != os.getpid() and b"ray" not in cmd:
                    continue
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except (OSError, ValueError):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(0.25)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_corpus(texts: list[str], target: Path, rows_per_file: int = 4000) -> None:
    import pyarrow as pa

    target.mkdir(parents=True)
    for k, start in enumerate(range(0, len(texts), rows_per_file)):
        chunk = texts[start : start + rows_per_file]
        table = pa.table({"id": [f"r{start + i}" for i in range(len(chunk))], "text": chunk})
        pq.write_table(table, target / f"part-{k:04d}.parquet", row_group_size=1024)


def bench_job(corpus: Path, model_dir: Path, out: Path, **overrides) -> dict:
    cfg = ScoreConfig(input=str(corpus), output=str(out), model=str(model_dir), progress=False, overwrite=True, **overrides)
    with RssSampler() as rss:
        start = time.perf_counter()
        manifest = run_score(cfg)
        elapsed = time.perf_counter() - start
    return {"rows": manifest["rows_out"], "seconds": elapsed, "peak_rss_mb": rss.peak / 2**20, "errors": manifest["rows_error"]}


def bench_forward(model, tokenizer, texts: list[str]) -> float:
    ids, _ = mtcls.tokenize(tokenizer, texts, 128)
    model.eval()
    start = time.perf_counter()
    mtcls.predict_probabilities(model, ids, tokenizer.pad_token_id)
    return len(texts) / (time.perf_counter() - start)


def bench_single_task_pipelines(encoder_dir: Path, texts: list[str], batch_size: int = 64) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    pipes = []
    for head in HEADS:
        model = AutoModelForSequenceClassification.from_pretrained(str(encoder_dir), num_labels=len(head["labels"]))
        pipes.append(pipeline("text-classification", model=model, tokenizer=tokenizer, device=-1))
    start = time.perf_counter()
    for pipe in pipes:
        pipe(texts, batch_size=batch_size, truncation=True, max_length=128)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4000, help="rows of the 1x run (the 10x run has 10 times more)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/goemotions/train.parquet"))
    parser.add_argument("--reference-rows", type=int, default=4000,
                        help="rows for (b), evenly spaced over the 10x corpus so lengths are representative; (c) uses a quarter")
    parser.add_argument("--block-rows", type=int, default=ScoreConfig.block_rows, help="the job's block_rows")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    data = Path(args.data)
    if not data.is_file():
        print(json.dumps({"skipped": f"{data} not found (needs ../shared/data)"}))
        return
    texts = pq.read_table(data, columns=["text"]).column("text").to_pylist()
    big = args.rows * 10
    texts = (texts * (big // len(texts) + 1))[:big]

    import ray
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    encoder_dir = mtcls.default_encoder_path()
    model = mtcls.MultiTaskModel.from_encoder(encoder_dir, HEADS).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    work = Path(tempfile.mkdtemp(prefix="mtcls-bench-"))
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    write_corpus(texts[: args.rows], work / "small")
    write_corpus(texts, work / "large")

    results: dict = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "torch": torch.__version__, "ray": ray.__version__},
        "model": "all-MiniLM-L6-v2 + 3 heads (28-label, 7-label multilabel; 4-class)",
        "corpus": f"GoEmotions train texts, max 128 tokens, {args.rows} and {big} rows",
        "block_rows": args.block_rows,
    }
    ray.init(include_dashboard=False, log_to_driver=False)
    small = bench_job(work / "small", work / "model", work / "out_small", block_rows=args.block_rows)
    large = bench_job(work / "large", work / "model", work / "out_large", block_rows=args.block_rows)
    ray.shutdown()
    steady = (large["rows"] - small["rows"]) / (large["seconds"] - small["seconds"])
    results["job"] = {"small": small, "large": large, "steady_state_rows_per_s": steady,
                      "end_to_end_rows_per_s_large": large["rows"] / large["seconds"]}

    torch.set_num_threads(os.cpu_count() or 1)
    step = max(1, len(texts) // args.reference_rows)
    ref = texts[::step][: args.reference_rows]
    forward = bench_forward(model, tokenizer, ref)
    single = bench_single_task_pipelines(encoder_dir, ref[::4])
    results["forward_sorted_rows_per_s"] = forward
    results["single_task_pipelines_rows_per_s"] = single
    results["ratios"] = {
        "job_over_forward": steady / forward,
        "job_over_single_task_pipelines": steady / single,
        "peak_rss_10x_over_1x": large["peak_rss_mb"] / small["peak_rss_mb"],
    }
    results["targets_met"] = {
        "job >= 0.85 x forward": steady >= 0.85 * forward,
        "job >= 4 x single-task pipelines": steady >= 4 * single,
        "10x rows <= 1.2 x peak RSS": large["peak_rss_mb"] <= 1.2 * small["peak_rss_mb"],
    }
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
