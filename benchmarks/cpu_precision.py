"""CPU precision: quality on real test sets and speed, fp32 against bf16 (``auto``) and int8.

    python -m benchmarks.cpu_precision --only quality --olid-model DIR --goemotions-model DIR
    python -m benchmarks.cpu_precision --only speed [--rows 3000]

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

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

import mtcls
from benchmarks.harness import (
    GOEMOTIONS, TEST_SETS, Timer, bench_job, decisions, forward_rows_per_s, machine, minilm_model, parser, print_json,
    repeat_to, save_model, start_ray, steady, write_corpus
)

PRECISIONS = ("fp32", "bf16", "int8")


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
        with Timer() as timer:
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
        out["precisions"][precision] = {"used": engine.precision.reason, "seconds": timer.seconds, "heads": heads}
    base = out["precisions"]["fp32"]["heads"]
    out["deltas_vs_fp32_points"] = {p: {h: 100 * (v["macro_f1"] - base[h]["macro_f1"]) for h, v in r["heads"].items()}
                                    for p, r in out["precisions"].items() if p != "fp32"}
    return out


def speed(rows: int, threads: int) -> dict:
    """Per precision (fp32, auto, int8): the bare forward's rows/s and the scoring job's steady-state rows/s."""
    from transformers import AutoTokenizer

    texts = pq.read_table(GOEMOTIONS / "train.parquet", columns=["text"]).column("text").to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(str(mtcls.default_encoder_path()))
    work = Path(tempfile.mkdtemp(prefix="mtcls-precision-"))
    model_dir = save_model(minilm_model(), tokenizer, work / "minilm")
    for name, n in (("1x", rows), ("10x", rows * 10)):
        write_corpus(repeat_to(texts, n), work / name)
    sample = mtcls.tokenize(tokenizer, texts[:: max(1, len(texts) // rows)][:rows], 128)
    out: dict = {}
    ray = start_ray()
    try:
        for precision in ("fp32", "auto", "int8"):
            torch.set_num_threads(threads)
            engine = mtcls.InferenceEngine.load(model_dir, torch_threads=threads, precision=precision, device="cpu", max_length=128)
            forward = forward_rows_per_s(engine, sample)
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
    cli = parser(__doc__)
    cli.add_argument("--only", default="quality,speed")
    cli.add_argument("--olid-model", help="model trained with jobs/configs/train/olid.yaml")
    cli.add_argument("--goemotions-model", help="model trained with jobs/configs/train/goemotions.yaml")
    cli.add_argument("--rows", type=int, default=3000, help="rows of the 1x job run and of the forward sample")
    cli.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = cli.parse_args()
    only = set(args.only.split(","))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    results: dict = {"machine": machine("cpus", "processor", "native_bf16", "torch")}
    if "quality" in only:
        models = {"olid": args.olid_model, "goemotions": args.goemotions_model}
        for name, model in models.items():
            if model:
                data, column = TEST_SETS[name]
                results[f"quality_{name}"] = quality(Path(model), data, [column], args.threads)
    if "speed" in only:
        results["speed"] = speed(args.rows, args.threads)
    print_json(results)


if __name__ == "__main__":
    main()
