"""Scoring on a GPU machine (rows/s per GPU), printed as JSON.

    python -m benchmarks.gpu_throughput [--rows 100000] [--long-rows 30000] [--models minilm,bert_base] [--out gpu.json]
    python -m benchmarks.gpu_throughput --allow-cpu --rows 300 --long-rows 30 --forward-rows 50 --budgets 2048   # checks this script on a CPU

Per model, at ``precision=auto`` (bf16 autocast on a GPU with bf16):
  forward_by_budget  the bare forward pass on one GPU, pre-tokenized rows fed ``block_rows`` at a time as
                     the job's actor gets them: rows/s and rows per forward pass, per token budget (how
                     the GPU default of ``max_tokens_per_batch`` is chosen);
  job                the scoring job on every GPU of the machine (one actor per GPU): steady-state rows/s
                     (extra rows / extra seconds of a 10x run over a 1x run, after a throwaway run that
                     starts the workers, so start-up cancels out), rows/s per GPU, and that over the
                     bare forward at the job's budget. Each run is checked from its manifest: no row
                     with an error, GPU actors on a GPU machine; the precision used is recorded;
  gpu_utilisation    ``nvidia-smi`` utilisation sampled every 0.2 s during the 10x run: the mean per GPU
                     over the whole run and over its middle 80% (no start-up, no tail).
Models: ``minilm`` is all-MiniLM-L6-v2 + the 3 heads of ``score_throughput.py`` on GoEmotions texts
(about 20 tokens); ``bert_base`` is a random BERT-base-sized encoder (12 layers, hidden 768) + the same
heads on texts of 128 tokens (consecutive GoEmotions texts joined, cut at 128).
Targets: MiniLM >= 40,000 rows/s per H100, BERT-base (128 tokens) >= 9,000.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

import mtcls
from benchmarks.harness import (
    GOEMOTIONS, HEADS, GpuSampler, Timer, bench_job, corpus_texts, machine, minilm_model, parser, print_json, repeat_to,
    save_model, skip, start_ray, steady, warm_up_workers, write_corpus
)
from mtcls.inference import DEFAULT_MAX_TOKENS, token_budget_batches
from pipelines.score import ScoreConfig

LONG_TOKENS = 128


def bert_base(tokenizer) -> mtcls.MultiTaskModel:
    """A random encoder of BERT-base's size (12 layers, hidden 768, 12 heads, FFN 3072) + the 3 heads."""
    from transformers import BertConfig

    torch.manual_seed(0)
    encoder = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=512)
    return mtcls.MultiTaskModel(mtcls.MultiTaskConfig(encoder=encoder, heads=HEADS, max_seq_length=LONG_TOKENS)).eval()


def long_texts(texts: list[str], tokenizer, rows: int, pool: int = 5000) -> list[str]:
    """``rows`` texts of at least 128 tokens: consecutive short texts joined with spaces (a pool of
    ``pool`` distinct ones, cycled)."""
    lengths = mtcls.tokenize(tokenizer, texts, 10_000).lengths - 2  # without [CLS] and [SEP]
    out, current, tokens = [], [], 2
    for text, n in zip(texts * 2, np.concatenate([lengths, lengths])):
        current.append(text)
        tokens += int(n)
        if tokens >= LONG_TOKENS:
            out.append(" ".join(current))
            current, tokens = [], 2
            if len(out) == pool:
                break
    return repeat_to(out, rows)


def forward_rate(model, tokenizer, texts: list[str], device: str, budget: int, block_rows: int) -> dict:
    """The bare forward at ``precision=auto`` on one device, fed ``block_rows`` rows per call as the job's
    actor is (rows are sorted by length within a call): rows/s and mean rows per forward pass."""
    engine = mtcls.InferenceEngine(model, tokenizer, "auto", device=device, max_length=LONG_TOKENS, max_tokens_per_batch=budget)
    tokens = engine.tokenize(texts)
    blocks = [mtcls.Tokens(tokens.ids[tokens.offsets[a]:tokens.offsets[b]], tokens.offsets[a:b + 1] - tokens.offsets[a], tokens.truncated[a:b])
              for a, b in ((a, min(a + block_rows, len(texts))) for a in range(0, len(texts), block_rows))]
    engine.predict_tokens(blocks[0])  # warm-up: CUDA kernels, allocator
    with Timer() as timer:
        for block in blocks:
            engine.predict_tokens(block)
    passes = sum(len(token_budget_batches(b.lengths, engine.max_tokens)) for b in blocks)
    return {"rows_per_s": len(texts) / timer.seconds, "rows_per_pass": len(texts) / passes}


def checked_job(corpus: Path, model_dir: Path, out: Path, gpus: int, **overrides) -> dict:
    """:func:`bench_job`, then a check from the manifest that it ran on the GPUs at a reduced precision, without errors."""
    result = bench_job(corpus, model_dir, out, **overrides)
    manifest = json.loads((out / "_manifest.json").read_text())
    result["resources"], result["precision"] = manifest["resources"], manifest["precision"]["used_this_run"]
    problems = []
    if result["errors"]:
        problems.append(f"{result['errors']} rows have an error")
    if gpus and manifest["resources"]["num_gpus"] < 1:
        problems.append(f"the job planned CPU actors on a GPU machine: {manifest['resources']}")
    if problems:
        raise SystemExit(f"{corpus.name}: " + "; ".join(problems))
    return result


def bench_model(name: str, model_dir: Path, model, tokenizer, texts: list[str], rows: int, args, work: Path, gpus: int) -> dict:
    """One model's forward sweep over token budgets, then its 1x and 10x jobs (the 10x one with GPU sampling)."""
    device = "cuda" if gpus else "cpu"
    sample = texts[: args.forward_rows]
    job_budget = args.max_tokens or DEFAULT_MAX_TOKENS[device]
    by_budget = {b: forward_rate(model, tokenizer, sample, device, b, args.block_rows) for b in sorted({*args.budgets, job_budget})}
    model.to("cpu")
    if gpus:
        torch.cuda.empty_cache()
    corpora = {}
    for label, n in (("1x", rows), ("10x", rows * 10)):
        corpora[label] = work / f"{name}_{label}"
        write_corpus(texts[:n], corpora[label], rows_per_file=args.rows_per_file)
    overrides = dict(precision="auto", max_tokens_per_batch=args.max_tokens, max_length=LONG_TOKENS,
                     rows_per_file=args.rows_per_file, block_rows=args.block_rows)
    warm_up_workers(texts, model_dir, work / f"{name}_warm", min(rows, 5000), **overrides)
    small = checked_job(corpora["1x"], model_dir, work / f"{name}_o1", gpus, **overrides)
    with GpuSampler() as sampler:
        large = checked_job(corpora["10x"], model_dir, work / f"{name}_o2", gpus, **overrides)
    rate = steady(small, large)
    per_gpu = rate / max(gpus, 1)
    return {"forward_by_budget": by_budget, "job_budget": job_budget,
            "job": {"steady_rows_per_s": rate, "rows_per_s_per_gpu": per_gpu,
                    "per_gpu_vs_bare_forward": per_gpu / by_budget[job_budget]["rows_per_s"], "small": small, "large": large},
            "gpu_utilisation": sampler.summary()}


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--rows", type=int, default=100_000, help="minilm: rows of the 1x job (the 10x job has 10 times more)")
    cli.add_argument("--long-rows", type=int, default=30_000, help="bert_base: rows of the 1x job")
    cli.add_argument("--forward-rows", type=int, default=20_000, help="rows of each bare forward measurement")
    cli.add_argument("--rows-per-file", type=int, default=50_000)
    cli.add_argument("--block-rows", type=int, default=ScoreConfig.model_fields["block_rows"].default, help="the job's block_rows")
    cli.add_argument("--models", default="minilm,bert_base")
    cli.add_argument("--budgets", default="16384,32768,65536,131072", help="token budgets for the bare forward sweep")
    cli.add_argument("--max-tokens", type=int, default=0, help="the job's max_tokens_per_batch (0: its device default)")
    cli.add_argument("--data", default=str(GOEMOTIONS / "train.parquet"))
    cli.add_argument("--out", help="also write the JSON here, after each model")
    cli.add_argument("--allow-cpu", action="store_true", help="run without a GPU (to check this script; figures mean nothing)")
    args = cli.parse_args()
    args.budgets = [int(b) for b in args.budgets.split(",")]
    gpus = torch.cuda.device_count()
    if not gpus and not args.allow_cpu:
        skip("no CUDA device (use --allow-cpu to check the script on a CPU)")
        return
    base = corpus_texts(Path(args.data))
    if base is None:
        raise SystemExit(1)

    from transformers import AutoTokenizer

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the jobs run (pipelines.runtime.init_ray)
    tokenizer = AutoTokenizer.from_pretrained(str(mtcls.default_encoder_path()))
    work = Path(tempfile.mkdtemp(prefix="mtcls-gpu-bench-"))
    results: dict = {"machine": machine("gpus", "cpus", "torch", "ray")}
    ray = start_ray(num_gpus=gpus)
    for name in args.models.split(","):
        if name == "minilm":
            model, rows = minilm_model(), args.rows
            texts = repeat_to(base, rows * 10)
        elif name == "bert_base":
            model, rows = bert_base(tokenizer), args.long_rows
            texts = long_texts(base, tokenizer, rows * 10)
        else:
            raise SystemExit(f"--models: unknown model {name!r} (minilm, bert_base)")
        model_dir = save_model(model, tokenizer, work / name)
        try:
            results[name] = bench_model(name, model_dir, model, tokenizer, texts, rows, args, work, gpus)
        except Exception as exc:  # keep the other model's figures
            results[name] = {"failed": f"{type(exc).__name__}: {exc}"}
        print_json({name: results[name]}, indent=None)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    ray.shutdown()
    per_gpu = {n: results.get(n, {}).get("job", {}).get("rows_per_s_per_gpu", 0) for n in ("minilm", "bert_base")}
    results["targets_met"] = {"minilm >= 40,000 rows/s per GPU": per_gpu["minilm"] >= 40_000,
                              "bert_base >= 9,000 rows/s per GPU": per_gpu["bert_base"] >= 9_000}
    shutil.rmtree(work, ignore_errors=True)
    print_json(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
