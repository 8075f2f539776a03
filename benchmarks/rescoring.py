"""Heads-only rescoring: a text run with embeddings, then the heads alone on its output, printed as JSON.

    python -m benchmarks.rescoring [--data ../shared/data/goemotions/test.parquet] [--small-rows 1000] [--copies 40]

Model: all-MiniLM-L6-v2 + the 3 heads of ``score_throughput.py`` (28- and 7-label multilabel,
4-class), fp32, max 128 tokens; texts: the GoEmotions test split (5,427 rows).
  text          the scoring job with ``embeddings=true``: a ``--small-rows`` run and a run over every
                row; steady state = extra rows / extra seconds of the larger run (start-up cancels out);
  heads_only    ``from_embeddings=true`` on the text run's output, and on that output copied
                ``--copies`` times (new ids, same vectors); steady state measured the same way;
  ratio         heads-only steady rows/s over the text run's;
  max_abs_diff  largest difference of any probability between the heads-only output and the text
                run's, per head (same rows, matched by id);
  bytes_per_row output Parquet (zstd) bytes per row: without the ``embedding`` column, and with it
                at float32 and float16 (heads-only runs with ``embeddings=true`` copy the vectors;
                the text run's own output is float32).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import mtcls
from benchmarks.harness import (
    HEADS, TEST_SETS, bench_job, corpus_texts, machine, minilm_model, parser, print_json, save_model, start_ray, steady,
    write_corpus
)


def parts(out: Path) -> list[Path]:
    """The output files of a scoring output directory, in order."""
    return sorted(out.glob("part-*.parquet"))


def bytes_per_row(out: Path) -> float:
    """Parquet bytes per row over a scoring output's files."""
    files = parts(out)
    return sum(p.stat().st_size for p in files) / sum(pq.ParquetFile(p).metadata.num_rows for p in files)


def replicate(out: Path, target: Path, copies: int) -> int:
    """The output's rows ``copies`` times, with new ids, one file per copy, its schema metadata kept."""
    table = pa.concat_tables([pq.read_table(p) for p in parts(out)])
    metadata = {b"mtcls": pq.read_schema(parts(out)[0]).metadata[b"mtcls"]}
    target.mkdir()
    ids = table.column("id").to_pylist()
    for k in range(copies):
        copy = table.set_column(0, "id", pa.array([f"{i}-c{k}" for i in ids]))
        pq.write_table(copy.replace_schema_metadata(metadata), target / f"copy-{k:03d}.parquet", compression="zstd",
                       row_group_size=1024)
    return table.num_rows * copies


def max_abs_diff(a: Path, b: Path) -> dict[str, float]:
    """Per head, the largest difference of any probability between two outputs of the same rows (matched by id)."""
    ta, tb = (pq.read_table(x).sort_by("id") for x in (a, b))
    assert ta.column("id").equals(tb.column("id"))
    ok = np.asarray(ta.column("error").is_null()) & np.asarray(tb.column("error").is_null())
    out = {}
    for head in HEADS:
        col = f"{head['name']}_probs"
        pa_, pb = (np.array(t.column(col).to_pylist(), dtype=np.float64)[ok] for t in (ta, tb))
        out[head["name"]] = float(np.abs(pa_ - pb).max())
    return out


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--data", default=str(TEST_SETS["goemotions"][0]))
    cli.add_argument("--small-rows", type=int, default=1000, help="rows of the smaller text run")
    cli.add_argument("--copies", type=int, default=40, help="the larger heads-only run reads the text output this many times")
    args = cli.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    data = Path(args.data)
    texts = corpus_texts(data)
    if texts is None:
        return

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(mtcls.default_encoder_path()))
    work = Path(tempfile.mkdtemp(prefix="mtcls-rescoring-"))
    model_dir = save_model(minilm_model(), tokenizer, work / "minilm")
    write_corpus(texts[:args.small_rows], work / "small")
    write_corpus(texts, work / "full")

    ray = start_ray()
    results: dict = {
        "machine": machine("cpus", "processor", "torch", "ray", "cuda"),
        "corpus": f"{data.name}: {len(texts)} rows (and its first {args.small_rows}); MiniLM + 3 heads, fp32, max 128 tokens",
    }
    text_small = bench_job(work / "small", model_dir, work / "text_small", embeddings=True)
    text_full = bench_job(work / "full", model_dir, work / "text_full", embeddings=True)
    heads_small = bench_job(work / "text_full", model_dir, work / "heads_small", from_embeddings=True)
    rows = replicate(work / "text_full", work / "copies", args.copies)
    heads_large = bench_job(work / "copies", model_dir, work / "heads_large", from_embeddings=True)
    assert heads_large["rows"] == rows
    f16 = bench_job(work / "text_full", model_dir, work / "heads_f16", from_embeddings=True, embeddings=True, embedding_dtype="float16")
    f32 = bench_job(work / "text_full", model_dir, work / "heads_f32", from_embeddings=True, embeddings=True)
    ray.shutdown()

    text_rate, heads_rate = steady(text_small, text_full), steady(heads_small, heads_large)
    diff = max_abs_diff(work / "text_full", work / "heads_small")
    results["text"] = {"steady_rows_per_s": text_rate, "small": text_small, "large": text_full}
    results["heads_only"] = {"steady_rows_per_s": heads_rate, "small": heads_small, "large": heads_large,
                             "with_embeddings_float16": f16, "with_embeddings_float32": f32}
    results["ratio"] = heads_rate / text_rate
    # End to end, start-up included, same rows: the text run over every row against its rescoring.
    results["end_to_end_ratio_same_rows"] = text_full["seconds"] / heads_small["seconds"]
    results["max_abs_diff"] = diff
    results["bytes_per_row"] = {
        "without_embedding": bytes_per_row(work / "heads_small"),
        "float32_text_run": bytes_per_row(work / "text_full"),
        "float32_rescored_copy": bytes_per_row(work / "heads_f32"),
        "float16_rescored_copy": bytes_per_row(work / "heads_f16"),
    }
    results["targets_met"] = {"ratio >= 20": results["ratio"] >= 20, "max_abs_diff <= 1e-4": max(diff.values()) <= 1e-4}
    shutil.rmtree(work, ignore_errors=True)
    print_json(results)


if __name__ == "__main__":
    main()
