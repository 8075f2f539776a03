"""Batch scoring on Ray Data: Parquet in, every head's predictions out, committed in waves.

Output directory layout (everything a reader skips starts with ``_``)::

    <output>/part-<wave>-*.parquet      the predictions (read the directory with any engine)
    <output>/_manifest.json             config, model, row counts, error counts, timings
    <output>/_SUCCESS                   written last, only when every input file is scored
    <output>/_mtcls/waves/<wave>.json   commit records (which inputs produced which files)
    <output>/_mtcls/staging/<wave>/     work in progress; removed on commit or on rerun

Input files are scored in waves of about ``wave_rows`` rows. A wave is written to staging, its
row count checked against the input's Parquet footers, recorded, then moved into place. A rerun skips
the input files of committed waves, finishes a wave that was being moved, and discards unrecorded
staging, so a killed job reruns to completion with every input row exactly once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import pyarrow as pa

from mtcls import MultiTaskConfig
from pipelines.artifacts import localize_model, model_identity, read_model_files
from pipelines.demo.corpus import default_corpus_dir
from pipelines.demo.default_model import default_model_dir
from pipelines.resources import plan_resources
from pipelines.runtime import init_ray
from pipelines.score.commit import OutputDir, count_output, plan_waves
from pipelines.score.config import ScoreConfig
from pipelines.score.predictor import ShippedPredictor
from pipelines.score.schema import output_schema
from pipelines.storage import inspect_parquet, list_parquet_files, locate, read_json, write_json

log = logging.getLogger(__name__)


def run_score(cfg: ScoreConfig) -> dict[str, Any]:
    """Scores every pending input file and writes the manifest; starts a local Ray if none is running.

    An empty ``input`` scores the embedded demo corpus and an empty ``model`` uses the embedded
    default model (trained on first use).

    Args:
        cfg: Validated config.

    Returns:
        The manifest (also written to ``<output>/_manifest.json``).

    Raises:
        InputError: Missing input, unreadable or corrupt Parquet, missing columns: before any output.
    """
    import ray
    import ray.data

    if not cfg.input:
        cfg = dataclasses.replace(cfg, input=str(default_corpus_dir() / "test.parquet"))
        log.info("no input given: scoring the embedded demo corpus %s", cfg.input)
    model_uri = cfg.model or str(default_model_dir())
    model_dir = localize_model(model_uri)
    init_ray()
    started = time.time()
    in_loc, out_loc = locate(cfg.input), locate(cfg.output)
    files = list_parquet_files(in_loc)
    passthrough = [cfg.id_column, *cfg.passthrough_columns]
    needed = list(dict.fromkeys([*passthrough, *cfg.text_columns]))
    in_schema, file_rows = inspect_parquet(in_loc, files, needed)
    identity = model_identity(model_dir, model_uri)
    model_config = MultiTaskConfig.from_pretrained(model_dir)
    schema = output_schema(
        model_config.head_specs(), pa.schema([in_schema.field(c) for c in passthrough]), identity, cfg.text_columns
    )

    out = OutputDir(out_loc)
    out.prepare(cfg.overwrite)
    records = out.recover()
    done_inputs = {path for rec in records for path in rec["inputs"]}
    pending = {p: n for p, n in file_rows.items() if p not in done_inputs}
    success = out_loc.join("_SUCCESS").path
    if not pending and out_loc.fs.exists(success):
        manifest = read_json(out_loc.join("_manifest.json"))
        manifest["rows_scored_this_run"] = 0
        log.info("output %s is complete; nothing to do", out_loc.uri())
        return manifest
    if out_loc.fs.exists(success):
        out_loc.fs.rm(success)  # new input files: the output is incomplete until they are scored
    plan = plan_resources(cfg, ray.cluster_resources())
    log.info("%d input files (%d rows), %d already scored; plan: %s", len(files), sum(file_rows.values()), len(files) - len(pending), plan)

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    ctx.max_errored_blocks = 0  # an errored block would lose rows: fail instead

    files_ref = [ray.put(read_model_files(model_dir))] if pending else None
    timings: dict[str, float] = {"setup_s": time.time() - started}
    score_started = time.time()
    scored_rows = 0
    for wave in plan_waves(pending, cfg.wave_rows):
        stage = out.staging.join(wave.name)
        ds = ray.data.read_parquet(wave.files, filesystem=in_loc.arrow_fs()).select_columns(needed)
        ds = ds.map_batches(
            ShippedPredictor,
            fn_constructor_kwargs=dict(
                files_ref=files_ref,
                schema=schema,
                text_columns=cfg.text_columns,
                max_length=cfg.max_length or model_config.max_seq_length,
                max_tokens_per_batch=cfg.max_tokens_per_batch,
                torch_threads=plan.torch_threads,
                precision=cfg.precision,
            ),
            batch_size=cfg.block_rows,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.num_actors),
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus,
        )
        ds.write_parquet(stage.path, filesystem=out_loc.arrow_fs(), min_rows_per_file=cfg.rows_per_file)
        staged = sorted(p for p in out_loc.fs.find(stage.path) if p.endswith(".parquet"))
        counts = count_output(out_loc, staged)
        if counts["rows_out"] != wave.rows:
            raise RuntimeError(
                f"wave {wave.name}: read {wave.rows} rows from {len(wave.files)} files but wrote {counts['rows_out']}; "
                f"nothing was committed (staging left at {stage.uri()})"
            )
        records.append(out.commit(wave, staged, counts))
        scored_rows += wave.rows
    timings["scoring_s"] = time.time() - score_started
    timings["total_s"] = time.time() - started

    manifest = {
        "status": "complete",
        "input": cfg.input,
        "output": cfg.output,
        "model": identity,
        "config": {k: v for k, v in vars(cfg).items()},
        "schema": {f.name: str(f.type) for f in schema},
        "rows_in": sum(file_rows.values()),
        "rows_out": sum(r["rows_out"] for r in records),
        "rows_error": sum(r["rows_error"] for r in records),
        "rows_truncated": sum(r["rows_truncated"] for r in records),
        "rows_scored_this_run": scored_rows,
        "input_files": {in_loc.uri(p): n for p, n in file_rows.items()},
        "output_files": sorted(f for r in records for f in r["files"]),
        "resources": vars(plan),
        "timings": timings,
        "rows_per_s_this_run": scored_rows / timings["scoring_s"] if scored_rows and timings["scoring_s"] > 0 else None,
    }
    if manifest["rows_out"] != manifest["rows_in"]:
        raise RuntimeError(
            f"output holds {manifest['rows_out']} rows but the input has {manifest['rows_in']}; "
            "were input files changed or removed since an earlier run? rerun with overwrite=true"
        )
    write_json(out_loc.join("_manifest.json"), manifest)
    with out_loc.fs.open(out_loc.join("_SUCCESS").path, "w") as fh:
        fh.write("")
    return manifest

