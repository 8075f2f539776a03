"""Delta Lake output against the Parquet directory, and what 1,000 Delta commits leave behind, printed as JSON.

    python -m benchmarks.table_output [--rows 4000] [--rounds 2] [--model minilm|tiny] [--commits 1000]

Figures:
  job        the scoring job's wall time on one GoEmotions corpus with ``output_format=parquet`` and
             ``delta`` (same input, same model, precision fp32), alternating, ``--rounds`` times each;
             the ratio parquet time / delta time per round and its median (>= 0.95: Delta costs at most 5%);
             then one more run of each with the rows a reader sees while it runs (Parquet: committed
             files; Delta: the latest version's files), sampled every 0.5 s: seconds until the first
             rows, and the timeline (not timed: the sampler shares the driver's process);
  metadata   a Delta output after ``--commits`` commits of one file each (the sink driven directly,
             no model): the bytes and files of ``_delta_log/`` and of the job's commit records
             (``_mtcls/commits/``), the time a rerun's resume takes, then the same after maintenance
             (a checkpoint and deltalake's ``cleanup_metadata`` with a zero log retention), and whether
             the rerun still finds every row committed.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.harness import (
    GOEMOTIONS, Timer, bench_job, corpus_texts, machine, minilm_model, parser, print_json, repeat_to, save_model,
    start_ray, tiny_model, warm_up_workers, write_corpus,
)


def visible_counter(out: Path, output_format: str) -> Callable[[], int]:
    """A function giving the rows a reader of ``out`` sees now (0 before the output exists)."""
    from pipelines.storage import locate

    if output_format == "delta":
        from deltalake import DeltaTable

        def delta_rows() -> int:
            if not (out / "_delta_log").exists():
                return 0
            actions = DeltaTable(str(out)).get_add_actions(flatten=True)
            return int(sum(actions.column("num_records").to_pylist()))

        return delta_rows
    from pipelines.sink.parquet import visible_rows

    return lambda: visible_rows(locate(str(out))) if out.exists() else 0


def run_job(corpus: Path, model_dir: Path, out: Path, output_format: str, rows_per_file: int, sample: bool) -> dict[str, Any]:
    """One scoring job into a fresh ``out``; with ``sample``, the rows a reader sees every 0.5 s while it runs
    (a sampling thread in the driver's process, so the timed runs are made without it)."""
    shutil.rmtree(out, ignore_errors=True)
    count = visible_counter(out, output_format)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    start = time.perf_counter()

    def sampler() -> None:
        while not stop.is_set():
            try:
                samples.append((round(time.perf_counter() - start, 1), count()))
            except Exception:  # noqa: BLE001 - a version being written: sample again
                pass
            stop.wait(0.5)

    thread = threading.Thread(target=sampler, daemon=True)
    if sample:
        thread.start()
    try:
        result = bench_job(corpus, model_dir, out, output_format=output_format, rows_per_file=rows_per_file,
                           block_rows=rows_per_file, commit_every_files=2, commit_every_s=5)
    finally:
        stop.set()
        if sample:
            thread.join()
    if not sample:
        return result
    first = next((t for t, n in samples if n > 0), None)
    return {**result, "first_rows_visible_s": first, "visible": [s for i, s in enumerate(samples) if i % 4 == 0]}


def job_figures(model_dir: Path, texts: list[str], rows: int, rounds: int, work: Path) -> dict[str, Any]:
    rows_per_file = 250
    write_corpus(repeat_to(texts, rows), work / "corpus", rows_per_file=1000)
    warm_up_workers(texts, model_dir, work, rows=500, precision="fp32")
    runs: dict[str, list[dict[str, Any]]] = {"parquet": [], "delta": []}
    for r in range(rounds):
        order = ("parquet", "delta") if r % 2 == 0 else ("delta", "parquet")
        for fmt in order:
            runs[fmt].append(run_job(work / "corpus", model_dir, work / f"out_{fmt}", fmt, rows_per_file, sample=False))
    ratios = [p["seconds"] / d["seconds"] for p, d in zip(runs["parquet"], runs["delta"])]
    visible = {fmt: run_job(work / "corpus", model_dir, work / f"out_{fmt}", fmt, rows_per_file, sample=True)
               for fmt in ("parquet", "delta")}
    return {"rows": rows, "rows_per_file": rows_per_file, "commit_every_files": 2, "runs": runs,
            "parquet_over_delta_time": [round(x, 3) for x in ratios], "median_ratio": round(statistics.median(ratios), 3),
            "visible_while_running": visible}


def metadata_figures(commits: int, work: Path) -> dict[str, Any]:
    """``commits`` one-file commits through the Delta sink, then its log and records before and after maintenance."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    from pipelines.blocks import PRECISION, ROW, UNIT, precision_column
    from pipelines.sink.delta import DeltaSink
    from pipelines.sink.schema import ERROR_COLUMN, TRUNCATED_COLUMN
    from pipelines.sink.units import plan_units
    from pipelines.storage import list_parquet_files, locate

    schema = pa.schema([("id", pa.string()), ("score", pa.float32()), (TRUNCATED_COLUMN, pa.bool_()), (ERROR_COLUMN, pa.string())])
    inp, out = work / "meta_in", work / "meta_out"
    inp.mkdir()
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(commits)], "text": ["t"] * commits}), inp / "a.parquet",
                   row_group_size=commits)
    loc = locate(str(inp))
    units, inputs = plan_units(loc, list_parquet_files(loc), 1)  # one row per unit: one file per commit
    prec = {"name": "fp32", "reason": "benchmark", "torch": "cpu", "ray_gpu_ids": []}
    sink = DeltaSink(locate(str(out)), schema, lock=False)
    with Timer() as writing, sink.open(overwrite=False, inputs=inputs):
        sink.resume(units, inputs)
        fn, kwargs = sink.write_stage(units, inputs, schema, None)
        for u in range(len(units)):
            block = pa.table({"id": [f"r{u}"], "score": pa.array(np.zeros(1), pa.float32()), TRUNCATED_COLUMN: [False],
                              ERROR_COLUMN: pa.nulls(1, pa.string()), UNIT: pa.array([u], pa.int32()),
                              ROW: pa.array([u], pa.int64()), PRECISION: precision_column(prec, 1)})
            sink.commit(fn(block, **kwargs))

    def sizes() -> dict[str, Any]:
        log_files = [p for p in (out / "_delta_log").rglob("*") if p.is_file()]
        records = [p for p in (out / "_mtcls" / "commits").rglob("*") if p.is_file()]
        return {"delta_log_files": len(log_files), "delta_log_mb": round(sum(p.stat().st_size for p in log_files) / 2**20, 2),
                "commit_record_files": len(records),
                "commit_records_mb": round(sum(p.stat().st_size for p in records) / 2**20, 2)}

    def rerun() -> dict[str, Any]:
        fresh = DeltaSink(locate(str(out)), schema, lock=False)
        with Timer() as load:
            DeltaTable(str(out))
        with Timer() as resume, fresh.open(overwrite=False, inputs=inputs):
            fresh_units, _ = plan_units(loc, list_parquet_files(loc), 1)
            fresh.resume(fresh_units, inputs)
        return {"table_load_s": round(load.seconds, 3), "resume_s": round(resume.seconds, 2),
                "rows_pending": sum(u.pending_rows for u in fresh_units)}

    before = {**sizes(), **rerun(), "version": DeltaTable(str(out)).version()}
    dt = DeltaTable(str(out))
    with Timer() as maintenance:
        dt.create_checkpoint()
        dt.alter.set_table_properties({"delta.logRetentionDuration": "interval 0 seconds"})
        DeltaTable(str(out)).create_checkpoint()
        DeltaTable(str(out)).cleanup_metadata()
    after = {**sizes(), **rerun(), "version": DeltaTable(str(out)).version()}
    return {"commits": commits, "write_and_commit_s": round(writing.seconds, 1), "before_maintenance": before,
            "maintenance_s": round(maintenance.seconds, 2), "after_maintenance": after}


def main() -> None:
    args = parser(__doc__)
    args.add_argument("--rows", type=int, default=4000)
    args.add_argument("--rounds", type=int, default=3)
    args.add_argument("--model", choices=["minilm", "tiny"], default="minilm")
    args.add_argument("--commits", type=int, default=1000)
    args.add_argument("--only", default="job,metadata")
    opts = args.parse_args()
    texts = corpus_texts(GOEMOTIONS / "train.parquet") if "job" in opts.only else []
    if texts is None:
        return None
    report: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="mtcls-table-bench-") as tmp:
        work = Path(tmp)
        if "metadata" in opts.only:
            report["metadata"] = metadata_figures(opts.commits, work)
        if "job" in opts.only:
            from transformers import AutoTokenizer

            import mtcls

            tokenizer = AutoTokenizer.from_pretrained(str(mtcls.default_encoder_path()))
            model = minilm_model() if opts.model == "minilm" else tiny_model(tokenizer)
            model_dir = save_model(model, tokenizer, work / "model")
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            start_ray(num_cpus=os.cpu_count())
            report["job"] = {"model": opts.model, **job_figures(model_dir, texts, opts.rows, opts.rounds, work)}
    print_json(report)


if __name__ == "__main__":
    main()
