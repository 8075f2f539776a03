"""Scoring throughput, memory and progressive commits, all in one run on one machine, printed as JSON.

    python benchmarks/score_throughput.py [--rows 4000] [--repeats 1] [--only host_ceiling,minilm,memory,progress]

On GoEmotions texts (max 128 tokens), figures named as in issue 11:
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

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mtcls  # noqa: E402
from pipelines.score import ScoreConfig, run_score  # noqa: E402
from pipelines.sink.parquet import visible_rows as output_visible_rows  # noqa: E402
from pipelines.storage import locate  # noqa: E402

HEADS = [
    {"name": "emotions", "kind": "multilabel", "labels": [f"e{i}" for i in range(28)]},
    {"name": "ekman", "kind": "multilabel", "labels": ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]},
    {"name": "sentiment", "kind": "multiclass", "labels": ["positive", "negative", "ambiguous", "neutral"]},
]


class Sampler:
    """Calls :meth:`sample` every ``interval`` seconds in a thread, between ``__enter__`` and ``__exit__``."""

    interval = 0.25

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class RssSampler(Sampler):
    """Peak summed RSS of the Ray processes (workers, raylet, GCS) and this driver."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def sample(self) -> None:
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
        self.peak = max(self.peak, total)


def cpu_seconds_by_process() -> dict[str, float]:
    """User + system CPU seconds of every live process, keyed ``"<pid> <command line, cut>"``."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
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


def corpus_texts(data: Path) -> list[str] | None:
    """The ``text`` column of ``data``; None, after printing a JSON "skipped" line, when it is missing."""
    if not data.is_file():
        print(json.dumps({"skipped": f"{data} not found (needs ../shared/data)"}))
        return None
    return pq.read_table(data, columns=["text"]).column("text").to_pylist()


def write_corpus(texts: list[str], target: Path, rows_per_file: int = 4000) -> None:
    target.mkdir(parents=True)
    for k, start in enumerate(range(0, len(texts), rows_per_file)):
        chunk = texts[start : start + rows_per_file]
        table = pa.table({"id": [f"r{start + i}" for i in range(len(chunk))], "text": chunk})
        pq.write_table(table, target / f"part-{k:04d}.parquet", row_group_size=1024)


def save_model(model: mtcls.MultiTaskModel, tokenizer, target: Path) -> Path:
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def bench_job(corpus: Path, model_dir: Path, out: Path, **overrides) -> dict:
    overrides.setdefault("precision", "fp32")  # the bare-forward comparisons here are at fp32 (auto is bf16 on some CPUs)
    cfg = ScoreConfig(input=str(corpus), output=str(out), model=str(model_dir), progress=False, overwrite=True, **overrides)
    with RssSampler() as rss:
        start = time.perf_counter()
        manifest = run_score(cfg)
        elapsed = time.perf_counter() - start
    return {"rows": manifest["rows_out"], "seconds": elapsed, "peak_rss_mb": rss.peak / 2**20, "errors": manifest["rows_error"]}


def steady(small: dict, large: dict) -> float:
    return (large["rows"] - small["rows"]) / (large["seconds"] - small["seconds"])


def bench_tokenizer(tokenizer, texts: list[str]) -> float:
    """The bare fast tokenizer on one thread (batch API, truncation at 128)."""
    os.environ["RAYON_NUM_THREADS"] = "1"
    mtcls.tokenize_flat(tokenizer, texts[:100], 128)  # warm-up
    start = time.perf_counter()
    mtcls.tokenize_flat(tokenizer, texts, 128)
    return len(texts) / (time.perf_counter() - start)


def bench_forward(model, tokenizer, texts: list[str], precision: str = "fp32", max_tokens: int | None = None) -> float:
    """The bare forward on every CPU (pre-tokenized rows, token-budget batches), rows/s."""
    torch.set_num_threads(os.cpu_count() or 1)
    tokens = mtcls.tokenize_flat(tokenizer, texts, 128)
    engine = mtcls.InferenceEngine(model, tokenizer, precision, device="cpu", max_tokens_per_batch=max_tokens)
    engine.predict_tokens(tokens.rows()[:64])  # warm-up
    start = time.perf_counter()
    engine.predict_tokens(tokens)
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


def tiny_model(tokenizer) -> mtcls.MultiTaskModel:
    from transformers import BertConfig

    torch.manual_seed(0)
    encoder = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)
    return mtcls.MultiTaskModel(mtcls.MultiTaskConfig(encoder=encoder, heads=HEADS)).eval()


def visible_rows(out: Path) -> int:
    return output_visible_rows(locate(str(out)))


def bench_progress(corpus: Path, model_dir: Path, out: Path, rows: int) -> dict:
    """Runs the job as a process, SIGKILLs it (and its Ray) once 30% is visible, reruns it."""
    cmd = [sys.executable, "-m", "jobs.score", f"input={corpus}", f"output={out}", f"model={model_dir}",
           "progress=false", "rows_per_file=5000", "lock_timeout_s=2", "overwrite=false"]
    marker = f"MTCLS_BENCH_{os.getpid()}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", marker: "1", "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    samples, start = [], time.time()
    while job.poll() is None:
        samples.append((round(time.time() - start, 1), visible_rows(out)))
        if samples[-1][1] >= 0.3 * rows:
            break
        time.sleep(0.2)
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000, help="rows of the 1x MiniLM run (the 10x run has 10 times more)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/goemotions/train.parquet"))
    parser.add_argument("--only", default="host_ceiling,minilm,memory,progress,pipelines,budget")
    parser.add_argument("--repeats", type=int, default=1,
                        help="minilm rounds (bare forward, 1x job, 10x job, bare forward); the figure is the median ratio")
    parser.add_argument("--block-rows", type=int, default=ScoreConfig.block_rows, help="the job's block_rows")
    parser.add_argument("--stage-stats", action="store_true",
                        help="log Ray Data's per-stage wall and CPU times after every job (stderr)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if args.stage_stats:
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("pipelines.score.run").setLevel(logging.DEBUG)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    base = corpus_texts(Path(args.data))
    if base is None:
        return

    import ray
    from transformers import AutoTokenizer

    encoder_dir = mtcls.default_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    work = Path(tempfile.mkdtemp(prefix="mtcls-bench-"))
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "ray": ray.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "corpus": f"GoEmotions train texts, max 128 tokens, {args.rows} and {args.rows * 10} rows (MiniLM)",
    }

    def corpus(rows: int, name: str) -> Path:
        texts = (base * (rows // len(base) + 1))[:rows]
        write_corpus(texts, work / name)
        return work / name

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the jobs run (pipelines.runtime.init_ray)
    ray.init(include_dashboard=False, log_to_driver=False)
    tiny = save_model(tiny_model(tokenizer), tokenizer, work / "tiny")
    # A throwaway run first: the first job of a Ray session also starts its workers (imports torch, transformers),
    # which would slow the 1x run only and inflate every steady-state figure.
    if only & {"host_ceiling", "minilm", "memory"}:
        bench_job(corpus(2_000, "warm"), tiny, work / "o0", block_rows=args.block_rows)
    if "host_ceiling" in only:
        small = bench_job(corpus(20_000, "tiny_1x"), tiny, work / "o1", block_rows=args.block_rows)
        large = bench_job(corpus(200_000, "tiny_10x"), tiny, work / "o2", block_rows=args.block_rows)
        tok_rate = bench_tokenizer(tokenizer, base[:20_000])
        rate = steady(small, large)
        results["host_ceiling"] = {"job_steady_rows_per_s": rate, "tokenizer_one_thread_rows_per_s": tok_rate,
                                   "ratio": rate / tok_rate, "small": small, "large": large}
    minilm = None
    if only & {"minilm", "memory", "pipelines"}:
        torch.manual_seed(0)
        minilm = mtcls.MultiTaskModel.from_encoder(encoder_dir, HEADS).eval()
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
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
