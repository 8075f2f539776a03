"""Scoring throughput, memory and progressive commits, all in one run on one machine, printed as JSON.

    python -m benchmarks.score_throughput [--rows 4000] [--repeats 1] [--only host_ceiling,minilm,memory,progress]

On GoEmotions texts (max 128 tokens), figures:
  host_ceiling  the scoring job's steady-state rows/s with a near-zero-cost encoder (1 layer, hidden 32,
                MiniLM's tokenizer, 3 heads) against the bare fast tokenizer on one thread: the ceiling
                of everything around the model (read, tokenize, batch, decode, write, commit);
  minilm        the job's steady-state rows/s with all-MiniLM-L6-v2 + 3 heads against the bare forward
                pass at the same precision (pre-tokenized, token-budget batches), measured right before
                and after the jobs; with --repeats K, K rounds and the median ratio; the CPU seconds
                each process used during the 10x run (the inference actor against the rest);
  memory        peak RSS of all Ray processes and the driver, for the 1x and the 10x run;
  progress      rows visible while a job runs; a job killed once 30% is visible, then rerun: the share
                of rows the rerun scores;
  budget        the bare MiniLM forward at several token budgets per batch (how the CPU default was chosen).
Steady state is the extra time of a 10x run over a 1x run, so start-up (actors, model load) cancels out;
a throwaway run first starts Ray's workers, which would otherwise slow only the first 1x run.
Also: three transformers ``pipeline("text-classification")`` runs (one per head), as users of
single-task models would do.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import mtcls
from benchmarks.harness import (
    GOEMOTIONS, HEADS, ROOT, Timer, bench_job, corpus_texts, cpu_seconds_by_process, cpu_used_during,
    forward_rows_per_s, machine, minilm_model, parser, print_json, process_ids, repeat_to, save_model, start_ray,
    steady, tiny_model, warm_up_workers, write_corpus
)


def bench_tokenizer(tokenizer, texts: list[str]) -> float:
    """The bare fast tokenizer on one thread (batch API, truncation at 128), rows/s."""
    os.environ["RAYON_NUM_THREADS"] = "1"
    mtcls.tokenize(tokenizer, texts[:100], 128)  # warm-up
    with Timer() as timer:
        mtcls.tokenize(tokenizer, texts, 128)
    return len(texts) / timer.seconds


def bench_forward(model, tokenizer, texts: list[str], precision: str = "fp32", max_tokens: int | None = None) -> float:
    """The bare forward on every CPU (pre-tokenized rows, token-budget batches), rows/s."""
    torch.set_num_threads(os.cpu_count() or 1)
    tokens = mtcls.tokenize(tokenizer, texts, 128)
    engine = mtcls.InferenceEngine(model, tokenizer, precision, device="cpu", max_tokens_per_batch=max_tokens)
    return forward_rows_per_s(engine, tokens)


def bench_single_task_pipelines(encoder_dir: Path, texts: list[str], batch_size: int = 64) -> float:
    """Rows/s of three transformers ``pipeline("text-classification")`` runs, one per head of :data:`HEADS`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    pipes = []
    for head in HEADS:
        model = AutoModelForSequenceClassification.from_pretrained(str(encoder_dir), num_labels=len(head["labels"]))
        pipes.append(pipeline("text-classification", model=model, tokenizer=tokenizer, device=-1))
    with Timer() as timer:
        for pipe in pipes:
            pipe(texts, batch_size=batch_size, truncation=True, max_length=128)
    return len(texts) / timer.seconds


def visible_rows(out: Path) -> int:
    """Rows of the committed output files in ``out``, as a reader sees them while the job runs."""
    from pipelines.sink.parquet import visible_rows as output_visible_rows
    from pipelines.storage import locate

    return output_visible_rows(locate(str(out)))


def bench_progress(corpus: Path, model_dir: Path, out: Path, rows: int) -> dict:
    """Runs the job as a process, SIGKILLs it (and its Ray) once 30% is visible, reruns it."""
    cmd = [sys.executable, "-m", "jobs.score", f"input={corpus}", f"output={out}", f"model={model_dir}",
           "progress=false", "rows_per_file=5000", "lock_timeout_s=2", "overwrite=false"]
    marker = f"MTCLS_BENCH_{os.getpid()}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", marker: "1"}
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    samples, start = [], time.time()
    while job.poll() is None:
        samples.append((round(time.time() - start, 1), visible_rows(out)))
        if samples[-1][1] >= 0.3 * rows:
            break
        time.sleep(0.2)
    for pid in process_ids():
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    job.wait()
    at_kill = visible_rows(out)
    rerun = subprocess.run(cmd, cwd=ROOT, env={**env, marker: "0"}, capture_output=True, text=True)
    manifest = json.loads((out / "_manifest.json").read_text())
    distinct = sorted({v for _, v in samples})
    return {"rows": rows, "visible_at_kill": at_kill, "visible_steps_before_kill": len(distinct),
            "rerun_rows_scored": manifest["rows_scored_this_run"], "rerun_share": manifest["rows_scored_this_run"] / rows,
            "rerun_ok": rerun.returncode == 0 and manifest["rows_out"] == rows}


def main() -> None:
    from pipelines.score import ScoreConfig

    cli = parser(__doc__)
    cli.add_argument("--rows", type=int, default=4000, help="rows of the 1x MiniLM run (the 10x run has 10 times more)")
    cli.add_argument("--data", default=str(GOEMOTIONS / "train.parquet"))
    cli.add_argument("--only", default="host_ceiling,minilm,memory,progress,pipelines,budget")
    cli.add_argument("--repeats", type=int, default=1,
                        help="minilm rounds (bare forward, 1x job, 10x job, bare forward); the figure is the median ratio")
    cli.add_argument("--block-rows", type=int, default=ScoreConfig.model_fields["block_rows"].default, help="the job's block_rows")
    cli.add_argument("--stage-stats", action="store_true",
                        help="log Ray Data's per-stage wall and CPU times after every job (stderr)")
    args = cli.parse_args()
    only = set(args.only.split(","))
    if args.stage_stats:
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("pipelines.score.run").setLevel(logging.DEBUG)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    base = corpus_texts(Path(args.data))
    if base is None:
        return

    from transformers import AutoTokenizer

    encoder_dir = mtcls.default_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    work = Path(tempfile.mkdtemp(prefix="mtcls-bench-"))
    results: dict = {
        "machine": machine("cpus", "processor", "torch", "ray", "cuda"),
        "corpus": f"GoEmotions train texts, max 128 tokens, {args.rows} and {args.rows * 10} rows (MiniLM)",
    }

    def corpus(rows: int, name: str) -> Path:
        write_corpus(repeat_to(base, rows), work / name)
        return work / name

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the jobs run (pipelines.runtime.init_ray)
    ray = start_ray()
    tiny = save_model(tiny_model(tokenizer), tokenizer, work / "tiny")
    if only & {"host_ceiling", "minilm", "memory"}:
        warm_up_workers(base, tiny, work, block_rows=args.block_rows)
    if "host_ceiling" in only:
        small = bench_job(corpus(20_000, "tiny_1x"), tiny, work / "o1", block_rows=args.block_rows)
        large = bench_job(corpus(200_000, "tiny_10x"), tiny, work / "o2", block_rows=args.block_rows)
        tok_rate = bench_tokenizer(tokenizer, base[:20_000])
        rate = steady(small, large)
        results["host_ceiling"] = {"job_steady_rows_per_s": rate, "tokenizer_one_thread_rows_per_s": tok_rate,
                                   "ratio": rate / tok_rate, "small": small, "large": large}
    minilm = None
    if only & {"minilm", "memory", "pipelines"}:
        minilm = minilm_model()
        model_dir = save_model(minilm, tokenizer, work / "minilm")
    if only & {"minilm", "memory"}:
        small_corpus, large_corpus = corpus(args.rows, "m_1x"), corpus(args.rows * 10, "m_10x")
        forward_texts = base[:: max(1, len(base) // 4000)][:4000]
        rounds = []
        for k in range(args.repeats):
            # The bare forward right before and right after the job pair: the ratio compares like with like
            # on a machine whose speed drifts between minutes.
            before = bench_forward(minilm, tokenizer, forward_texts)
            small = bench_job(small_corpus, model_dir, work / f"o3_{k}", block_rows=args.block_rows)
            cpu_before = cpu_seconds_by_process()
            large = bench_job(large_corpus, model_dir, work / f"o4_{k}", block_rows=args.block_rows)
            large["cpu_by_process"] = cpu_used_during(cpu_before, cpu_seconds_by_process())
            after = bench_forward(minilm, tokenizer, forward_texts)
            rate, forward = steady(small, large), (before + after) / 2
            rounds.append({"job_steady_rows_per_s": rate, "forward_rows_per_s": forward, "forward_before_after": [before, after],
                           "ratio": rate / forward, "small": small, "large": large})
        ratios = sorted(r["ratio"] for r in rounds)
        results["minilm"] = {"ratio": ratios[len(ratios) // 2], "ratios": [r["ratio"] for r in rounds],
                             "precision": "fp32", "rounds": rounds}
        small, large = rounds[0]["small"], rounds[0]["large"]
        results["memory"] = {"peak_rss_mb_1x": small["peak_rss_mb"], "peak_rss_mb_10x": large["peak_rss_mb"],
                             "ratio": large["peak_rss_mb"] / small["peak_rss_mb"]}
    ray.shutdown()
    if "progress" in only:
        results["progress"] = bench_progress(corpus(300_000, "progress"), tiny, work / "o5", 300_000)
    if "budget" in only and minilm is not None:
        sample = base[:: max(1, len(base) // 2000)][:2000]
        results["forward_rows_per_s_by_token_budget"] = {
            budget: bench_forward(minilm, tokenizer, sample, max_tokens=budget) for budget in (512, 1024, 1536, 2048, 4096, 8192)}
    if "pipelines" in only and minilm is not None:
        results["single_task_pipelines_rows_per_s"] = bench_single_task_pipelines(encoder_dir, base[:1000])
    results["targets_met"] = {
        "host_ceiling >= 1.0x tokenizer": results.get("host_ceiling", {}).get("ratio", 0) >= 1.0,
        "minilm >= 0.95x forward": results.get("minilm", {}).get("ratio", 0) >= 0.95,
        "memory 10x <= 1.2x": results.get("memory", {}).get("ratio", 9) <= 1.2,
        "progress rerun <= 0.8": results.get("progress", {}).get("rerun_share", 1) <= 0.8,
    }
    shutil.rmtree(work, ignore_errors=True)
    print_json(results)


if __name__ == "__main__":
    main()
