"""CPU precision: quality on real test sets and speed, fp32 against bf16 (``auto``) and int8 (issue 12).

    python benchmarks/cpu_precision.py --only quality --olid-model DIR --goemotions-model DIR
    python benchmarks/cpu_precision.py --only speed [--rows 3000]

``quality``: scores the OLID and GoEmotions test sets with models trained by the shipped configs
(``jobs/configs/train/{olid,goemotions}.yaml``) at every precision, through the same
:class:`mtcls.InferenceEngine` the jobs use. Per head: test macro-F1 and the share of rows whose
decision (label, or label set for multilabel heads) equals fp32's, and the share of single
decisions (per row and label for multilabel heads) that do. Macro-F1 counts the rows labelled for
the head (OLID's subtask_b and subtask_c label only offensive tweets); agreement counts every row.

``speed``: in one run, for all-MiniLM-L6-v2 + 3 heads on GoEmotions texts, the bare forward pass
(pre-tokenized, token-budget batches) and the scoring job's steady-state rows/s (the rate between
a 1x and a 10x run) at fp32, auto and int8.

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

import mtcls
from score_throughput import HEADS, ROOT, bench_job, save_model, steady, write_corpus

DATA = ROOT.parent / "shared" / "data"
TEST_SETS = {"olid": (DATA / "olid" / "test.parquet", ["tweet"]), "goemotions": (DATA / "goemotions" / "test.parquet", ["text"])}
PRECISIONS = ("fp32", "bf16", "int8")


def decisions(spec: mtcls.HeadSpec, probs: np.ndarray) -> np.ndarray:
    """One comparable decision per row: the label index, or the packed label set (multilabel)."""
    picked = np.asarray(mtcls.predict_indices(spec, probs))
    return picked.reshape(len(picked), -1)


def quality(model_dir: Path, data: Path, text_columns: list[str], threads: int) -> dict:
    """Per precision and head: macro-F1 on the labelled rows and decision agreement with fp32."""
    torch.set_num_threads(threads)
    table = pq.read_table(data)
    texts, _ = mtcls.join_texts({c: table.column(c).to_pylist() for c in text_columns}, " ")  # one column each: no separator
    keep = [i for i, t in enumerate(texts) if t is not None]
    out: dict = {"rows": len(keep), "model": str(model_dir), "data": str(data), "precisions": {}}
    reference: dict[str, np.ndarray] = {}
    for precision in PRECISIONS:
        engine = mtcls.InferenceEngine.load(model_dir, torch_threads=threads, precision=precision, device="cpu")
        start = time.perf_counter()
        probs, _ = engine.predict([texts[i] for i in keep])
        heads = {}
        for name, spec in engine.specs.items():
            labels = mtcls.encode_labels(spec, [table.column(name)[i].as_py() for i in keep], on_unknown="mark")
            report = mtcls.head_report(spec, mtcls.head_statistics(spec, labels, probs[name]))
            dec = decisions(spec, probs[name])
            reference.setdefault(name, dec)
            heads[name] = {"macro_f1": report["macro_f1"],
                           # rows whose whole decision (label, or label set) equals fp32's
                           "agreement_with_fp32": float(np.mean(np.all(dec == reference[name], axis=1))),
                           # single decisions (one per row, or one per row and label for multilabel)
                           "decision_agreement_with_fp32": float(np.mean(dec == reference[name]))}
        out["precisions"][precision] = {"used": engine.precision.reason, "seconds": time.perf_counter() - start, "heads": heads}
    base = out["precisions"]["fp32"]["heads"]
    out["deltas_vs_fp32_points"] = {p: {h: 100 * (v["macro_f1"] - base[h]["macro_f1"]) for h, v in r["heads"].items()}
                                    for p, r in out["precisions"].items() if p != "fp32"}
    return out


def forward_rate(engine: mtcls.InferenceEngine, tokens: mtcls.Tokens) -> float:
    engine.predict_tokens(tokens.rows()[:64])  # warm-up (and, for int8, the first quantized call)
    start = time.perf_counter()
    engine.predict_tokens(tokens)
    return len(tokens) / (time.perf_counter() - start)


def speed(rows: int, threads: int) -> dict:
    from transformers import AutoTokenizer

    import ray

    texts = pq.read_table(DATA / "goemotions" / "train.parquet", columns=["text"]).column("text").to_pylist()
    encoder = mtcls.default_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(str(encoder))
    work = Path(tempfile.mkdtemp(prefix="mtcls-precision-"))
    torch.manual_seed(0)
    model_dir = save_model(mtcls.MultiTaskModel.from_encoder(encoder, HEADS).eval(), tokenizer, work / "minilm")
    for name, n in (("1x", rows), ("10x", rows * 10)):
        write_corpus((texts * (n // len(texts) + 1))[:n], work / name)
    sample = mtcls.tokenize_flat(tokenizer, texts[:: max(1, len(texts) // rows)][:rows], 128)
    out: dict = {}
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        for precision in ("fp32", "auto", "int8"):
            torch.set_num_threads(threads)
            engine = mtcls.InferenceEngine.load(model_dir, torch_threads=threads, precision=precision, device="cpu", max_length=128)
            forward = forward_rate(engine, sample)
            small = bench_job(work / "1x", model_dir, work / f"o-{precision}-1", precision=precision, max_length=128)
            large = bench_job(work / "10x", model_dir, work / f"o-{precision}-10", precision=precision, max_length=128)
            job = steady(small, large)
            out[precision] = {"used": engine.precision.name, "why": engine.precision.reason, "forward_rows_per_s": forward,
                              "job_steady_rows_per_s": job, "job_vs_forward": job / forward, "small": small, "large": large}
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    for precision in ("auto", "int8"):
        out[precision]["job_vs_fp32_job"] = out[precision]["job_steady_rows_per_s"] / out["fp32"]["job_steady_rows_per_s"]
        out[precision]["forward_vs_fp32_forward"] = out[precision]["forward_rows_per_s"] / out["fp32"]["forward_rows_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="quality,speed")
    parser.add_argument("--olid-model", help="model trained with jobs/configs/train/olid.yaml")
    parser.add_argument("--goemotions-model", help="model trained with jobs/configs/train/goemotions.yaml")
    parser.add_argument("--rows", type=int, default=3000, help="rows of the 1x job run and of the forward sample")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    only = set(args.only.split(","))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    results: dict = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                                 "native_bf16": mtcls.precision.cpu_native_bf16(), "torch": torch.__version__}}
    if "quality" in only:
        models = {"olid": args.olid_model, "goemotions": args.goemotions_model}
        for name, model in models.items():
            if model:
                data, columns = TEST_SETS[name]
                results[f"quality_{name}"] = quality(Path(model), data, columns, args.threads)
    if "speed" in only:
        results["speed"] = speed(args.rows, args.threads)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
