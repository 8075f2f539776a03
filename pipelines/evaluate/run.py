"""Evaluation on Ray Data: score labelled data (or join a scoring output to labels), sum statistics, report."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mtcls import HeadSpec, MultiTaskConfig, text_separator
from pipelines.artifacts import export_model, localize_model, model_identity
from pipelines.config import ConfigError, check_max_length, config_to_dict
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.report import plot_confusion, plot_reliability, report_markdown
from pipelines.evaluate.statistics import (
    _HAS_LABELS, _HAS_PRED, _predictions_stats, build_report, merge_block_statistics, resolve_label_columns,
    scored_block_statistics,
)
from pipelines.actor import InferenceActor, ScoredColumns
from pipelines.blocks import PRECISION, PRECISION_TYPE
from pipelines.inference import shipped_model_files
from pipelines.sink.schema import output_schema
from pipelines.tokenize import ship_tokenizer, tokenize_stage
from pipelines.resources import InferencePlan, cpu_stage_cpus, plan_inference
from pipelines.progress import Progress
from pipelines.runtime import data_progress, init_ray
from pipelines.sink.completion import delta_output_metadata, require_complete
from pipelines.sources import resolve_input
from pipelines.storage import (InputError, column_names, inspect_parquet, locate, redact_uri, redact_uris,
                               write_json)

log = logging.getLogger(__name__)

#: Rows of the predictions per hash partition of the labels join.
JOIN_ROWS_PER_PARTITION = 1_000_000


def evaluate_predictions(cfg: EvalConfig, specs: list[HeadSpec]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Joins a scoring output to a labels table and returns (merged totals, join counts)."""
    import ray.data

    pred_loc, label_loc = locate(cfg.predictions), locate(cfg.labels)
    pred_files = resolve_input(pred_loc).files  # a Delta scoring output: the files of its latest version
    label_files = resolve_input(label_loc).files
    label_columns = resolve_label_columns(specs, column_names(label_loc, label_files[0]), cfg.label_columns)
    needed_labels = list(dict.fromkeys([cfg.id_column, *label_columns.values(), *cfg.slice_by]))
    inspect_parquet(label_loc, label_files, needed_labels)
    pred_cols = [cfg.id_column, "error", *[f"{h}_probs" for h in label_columns]]
    _, pred_rows = inspect_parquet(pred_loc, pred_files, pred_cols)
    total = sum(pred_rows.values())
    # Hash partitions of the join: about JOIN_ROWS_PER_PARTITION rows each (each partition is a task's
    # work), never more than there are prediction files.
    partitions = max(1, min(len(pred_files), -(-total // JOIN_ROWS_PER_PARTITION)))

    preds = ray.data.read_parquet(pred_files, filesystem=pred_loc.arrow_fs()).select_columns(pred_cols)
    preds = preds.add_column(_HAS_PRED, lambda b: pa.array([True] * b.num_rows), batch_format="pyarrow")
    labels = ray.data.read_parquet(label_files, filesystem=label_loc.arrow_fs()).select_columns(needed_labels)
    labels = labels.add_column(_HAS_LABELS, lambda b: pa.array([True] * b.num_rows), batch_format="pyarrow")
    clash = [c for c in needed_labels if c != cfg.id_column and c in pred_cols]
    if clash:
        raise InputError(f"columns {clash} are in both the predictions and the labels; rename them in the labels")
    joined = preds.join(labels, join_type="full_outer", num_partitions=partitions, on=(cfg.id_column,),
                        aggregator_ray_remote_args={"num_cpus": 0.25})
    spec_dicts = [s.to_dict() for s in specs]
    per_block = joined.map_batches(
        _predictions_stats, fn_kwargs=dict(specs=spec_dicts, label_columns=label_columns, slice_by=cfg.slice_by, bins=cfg.threshold_bins),
        batch_format="pyarrow", batch_size=None,
    )
    log.info("evaluate %s (%d files, %d rows) joined to the labels %s on %r, heads %s", redact_uri(cfg.predictions),
             len(pred_files), total, redact_uri(cfg.labels), cfg.id_column, ", ".join(label_columns))
    blocks = _gather(per_block, Progress("evaluate", total, unit="prediction rows", errors="error rows", logger=log),
                     lambda stats: stats["rows"] + stats["predictions_without_labels"])
    totals = merge_block_statistics(specs, blocks)
    join = {key: sum(b[key] for b in blocks) for key in ("predictions_without_labels", "labels_without_predictions")}
    join["matched"] = totals["rows"]
    return totals, {"label_columns": label_columns, "join": join}


def evaluate_data(cfg: EvalConfig, specs: list[HeadSpec], model_dir: Any, model_files_ref: Any, max_length: int,
                  plan: InferencePlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scores labelled data and returns (merged totals, details).

        read Parquet -> tokenize (CPU tasks) -> InferenceActor (scored columns) -> statistics (CPU tasks)

    The same tokenizing stage and actor as scoring; no row comes back to the driver, only each
    block's statistics.
    """
    import ray
    import ray.data
    from transformers import AutoTokenizer

    loc = locate(cfg.data)
    files = resolve_input(loc).files
    label_columns = resolve_label_columns(specs, column_names(loc, files[0]), cfg.label_columns)
    kept = list(dict.fromkeys([*label_columns.values(), *cfg.slice_by]))
    needed = list(dict.fromkeys([*cfg.text_columns, *kept]))
    in_schema, file_rows = inspect_parquet(loc, files, needed)
    total = sum(file_rows.values())
    model_config = MultiTaskConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stage_cpus = cpu_stage_cpus(ray.cluster_resources(), plan)
    schema = output_schema(specs, pa.schema([in_schema.field(c) for c in kept]), {}, cfg.text_columns)
    carried = pa.schema([*schema, pa.field(PRECISION, PRECISION_TYPE)])
    ds = ray.data.read_parquet(files, filesystem=loc.arrow_fs()).select_columns(needed)
    ds = ds.map_batches(
        tokenize_stage, batch_format="pyarrow", num_cpus=stage_cpus,
        fn_kwargs=dict(keep=kept, text_columns=cfg.text_columns, separator=text_separator(model_config, tokenizer),
                       max_length=max_length, tokenizer_ref=[ray.put(ship_tokenizer(model_dir))]),
    )
    ds = ds.map_batches(
        InferenceActor, batch_size=cfg.block_rows, batch_format="pyarrow",
        fn_constructor_kwargs=dict(files_ref=model_files_ref, inputs="tokens", output=ScoredColumns(carried),
                                   max_length=max_length, max_tokens_per_batch=cfg.max_tokens_per_batch or None,
                                   precision=cfg.precision, torch_threads=plan.torch_threads, with_uncalibrated=True),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.num_actors),
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
    )
    per_block = ds.map_batches(
        scored_block_statistics, batch_format="pyarrow", batch_size=None, num_cpus=stage_cpus,
        fn_kwargs=dict(specs=[s.to_dict() for s in specs], label_columns=label_columns, slice_by=cfg.slice_by, bins=cfg.threshold_bins),
    )
    log.info("evaluate %s (%d files, %d rows), heads %s; %d actors x (%g CPU, %g GPU), %d torch threads each, precision %s",
             redact_uri(cfg.data), len(files), total, ", ".join(s.name for s in specs), plan.num_actors, plan.num_cpus,
             plan.num_gpus, plan.torch_threads, cfg.precision)
    blocks = _gather(per_block, Progress("evaluate", total, unit="rows", errors="error rows", logger=log),
                     lambda stats: stats["rows"])
    devices = {json.dumps(d, sort_keys=True): d for b in blocks for d in b.pop("devices")}
    return merge_block_statistics(specs, blocks), {"label_columns": label_columns,
                                                  "devices": [devices[k] for k in sorted(devices)]}


def _gather(per_block: Any, progress: Progress, counted: Any) -> list[dict[str, Any]]:
    """Each block's statistics (one row per block), advancing ``progress`` by ``counted(stats)`` rows
    and the block's unscored rows as errors."""
    blocks = []
    with progress:
        for row in per_block.iter_rows():
            blocks.append(row["stats"])
            progress.advance(counted(row["stats"]), errors=row["stats"]["unscored"])
    return blocks


def specs_from_predictions(uri: str) -> tuple[list[HeadSpec], dict[str, Any]]:
    """Head specs and model identity from a scoring output's schema metadata."""
    import pyarrow.parquet as pq

    from pipelines.sink.schema import read_metadata

    loc = locate(uri)
    source = resolve_input(loc)
    if source.format == "delta":  # compaction drops data files' footers: the table keeps the metadata
        meta = delta_output_metadata(loc)
    else:
        with loc.fs.open(source.files[0], "rb") as fh:
            meta = read_metadata(pq.ParquetFile(fh).schema_arrow)
    return [HeadSpec.from_dict(h["spec"]) for h in meta["heads"]], meta["model"]




def run_evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluates every head and writes the report directory; starts a local Ray if none is running.

    Needs ``data`` and ``model``, or ``predictions`` and ``labels`` (``jobs.evaluate`` fills in the
    embedded demo corpus and default model).

    Returns:
        The report (also written to ``<output>/report.json``, with ``report.md`` and PNGs).
    """
    import ray

    model_dir = None
    incomplete: list[str] = []
    if cfg.predictions:
        # Before anything reads the output: a partial one would give a report on part of the rows.
        incomplete = require_complete(locate(cfg.predictions), cfg.allow_incomplete, "allow_incomplete")
        specs, identity = specs_from_predictions(cfg.predictions)
    else:
        if not cfg.data or not cfg.model:
            raise ConfigError(f"key '{'data' if not cfg.data else 'model'}': run_evaluate needs it with data= "
                              "(or predictions= and labels=); jobs.evaluate fills in the embedded default")
        model_uri = cfg.model
        model_dir = localize_model(model_uri)
        model_config = MultiTaskConfig.from_pretrained(model_dir)
        specs = model_config.head_specs()
        max_length = cfg.max_length or model_config.max_seq_length
        check_max_length(max_length, model_config.max_positions, bool(cfg.max_length))
        identity = model_identity(model_dir, model_uri)
        model_files = shipped_model_files(model_dir, cfg.precision)

    init_ray()
    data_progress(cfg.progress and cfg.verbose)
    if cfg.predictions:
        totals, details = evaluate_predictions(cfg, specs)
    else:
        plan = plan_inference(ray.cluster_resources(), num_actors=cfg.num_actors,
                              num_gpus_per_actor=0 if cfg.precision == "int8" else -1)
        totals, details = evaluate_data(cfg, specs, model_dir, [ray.put(model_files)], max_length, plan)

    report = build_report(specs, totals, details["label_columns"], cfg.tune_thresholds)
    report["model"] = redact_uris(identity)
    report["config"] = redact_uris(config_to_dict(cfg))
    if incomplete:
        report["predictions_incomplete"] = incomplete
    for key in ("join", "devices"):
        if key in details:
            report[key] = details[key]
    out = locate(cfg.output)
    out.fs.makedirs(out.path, exist_ok=True)
    write_json(out.join("report.json"), report)
    with out.fs.open(out.join("report.md").path, "w") as fh:
        fh.write(report_markdown(report))
    if cfg.plots:
        with tempfile.TemporaryDirectory() as tmp:
            for head, rep in report["heads"].items():
                local = str(Path(tmp) / f"{head}_confusion.png")
                plot_confusion(head, rep, local)
                out.fs.put(local, out.join(f"{head}_confusion.png").path)
            for head, cal in report["calibration"].items():
                local = str(Path(tmp) / f"{head}_reliability.png")
                plot_reliability(head, cal, local)
                out.fs.put(local, out.join(f"{head}_reliability.png").path)
    if cfg.save_tuned_model:
        if model_dir is None:
            raise ConfigError("key 'save_tuned_model': needs a model (evaluate with data + model)")
        tuned = {h: t["thresholds"] for h, t in report.get("threshold_tuning", {}).items()}
        export_model(model_dir, cfg.save_tuned_model, thresholds=tuned)
    return report
