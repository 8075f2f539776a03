"""Evaluation on Ray Data: score labelled data (or join a scoring output to labels), sum statistics, report."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mtcls import HeadSpec, MultiTaskConfig
from mtcls.inference import uncalibrated_key
from pipelines.artifacts import export_model, localize_model, model_identity
from pipelines.config import ConfigError, config_to_dict
from pipelines.demo.corpus import default_corpus_dir
from pipelines.demo.default_model import default_model_dir
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.report import plot_confusion, plot_reliability, report_markdown
from pipelines.evaluate.statistics import (
    _HAS_LABELS, _HAS_PRED, _predictions_stats, block_statistics, build_report, merge_block_statistics,
    resolve_label_columns,
)
from pipelines.inference import load_shipped_engine, predict_with_retry, shipped_model_files, texts_from_columns
from pipelines.resources import InferencePlan, plan_inference
from pipelines.runtime import init_ray
from pipelines.storage import InputError, column_names, inspect_parquet, list_parquet_files, locate, write_json

log = logging.getLogger(__name__)


class _EvalActor:
    """Scores labelled blocks with the shared inference engine and returns their statistics (one row per block)."""

    def __init__(self, files_ref: list, specs: list[dict], label_columns: dict[str, str], text_columns: list[str],
                 slice_by: list[str], bins: int, **engine_kwargs: Any) -> None:
        import ray

        self.engine, self._copy = load_shipped_engine(files_ref, **engine_kwargs)
        # Where this actor runs: the GPUs Ray gave it and the device torch uses (shown in the report).
        self.device = {"ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()], "torch": self.engine.device.type,
                       "precision": self.engine.precision.name, "precision_reason": self.engine.precision.reason}
        self.specs = [HeadSpec.from_dict(s) for s in specs]
        self.label_columns, self.text_columns, self.slice_by, self.bins = label_columns, text_columns, slice_by, bins

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts, rows, _ = texts_from_columns(batch, self.text_columns, self.engine.separator)
        probs, failures = predict_with_retry(self.engine, self.engine.tokenize(texts))
        good = np.array([f is None for f in failures], dtype=bool)
        scored = np.zeros(batch.num_rows, dtype=bool)
        scored[rows[good]] = True
        probs = {name: p[good] for name, p in probs.items()}
        # The engine was made with_uncalibrated: heads with a temperature also come without it.
        uncalibrated = {s.name: probs.pop(uncalibrated_key(s.name)) for s in self.specs if uncalibrated_key(s.name) in probs}
        stats = block_statistics(batch, self.specs, self.label_columns, probs, scored, self.slice_by, self.bins, uncalibrated)
        stats["device"] = self.device
        return pa.table({"stats": [json.dumps(stats)]})


def evaluate_predictions(cfg: EvalConfig, specs: list[HeadSpec]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Joins a scoring output to a labels table and returns (merged totals, join counts)."""
    import ray.data

    pred_loc, label_loc = locate(cfg.predictions), locate(cfg.labels)
    pred_files = list_parquet_files(pred_loc)
    label_files = list_parquet_files(label_loc)
    label_columns = resolve_label_columns(specs, column_names(label_loc, label_files[0]), cfg.label_columns)
    needed_labels = list(dict.fromkeys([cfg.id_column, *label_columns.values(), *cfg.slice_by]))
    inspect_parquet(label_loc, label_files, needed_labels)
    pred_cols = [cfg.id_column, "error", *[f"{h}_probs" for h in label_columns]]
    inspect_parquet(pred_loc, pred_files, pred_cols)

    preds = ray.data.read_parquet(pred_files, filesystem=pred_loc.arrow_fs()).select_columns(pred_cols)
    preds = preds.add_column(_HAS_PRED, lambda b: pa.array([True] * b.num_rows), batch_format="pyarrow")
    labels = ray.data.read_parquet(label_files, filesystem=label_loc.arrow_fs()).select_columns(needed_labels)
    labels = labels.add_column(_HAS_LABELS, lambda b: pa.array([True] * b.num_rows), batch_format="pyarrow")
    clash = [c for c in needed_labels if c != cfg.id_column and c in pred_cols]
    if clash:
        raise InputError(f"columns {clash} are in both the predictions and the labels; rename them in the labels")
    joined = preds.join(labels, join_type="full_outer", num_partitions=max(1, len(pred_files)), on=(cfg.id_column,),
                        aggregator_ray_remote_args={"num_cpus": 0.25})
    spec_dicts = [s.to_dict() for s in specs]
    per_block = joined.map_batches(
        _predictions_stats, fn_kwargs=dict(specs=spec_dicts, label_columns=label_columns, slice_by=cfg.slice_by, bins=cfg.threshold_bins),
        batch_format="pyarrow", batch_size=None,
    )
    blocks = [json.loads(r["stats"]) for r in per_block.take_all()]
    totals = merge_block_statistics(specs, blocks)
    join = {key: sum(b[key] for b in blocks) for key in ("predictions_without_labels", "labels_without_predictions")}
    join["matched"] = totals["rows"]
    return totals, {"label_columns": label_columns, "join": join}


def evaluate_data(cfg: EvalConfig, specs: list[HeadSpec], model_files_ref: Any, max_length: int,
                  plan: InferencePlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scores labelled data with the model in an actor pool; returns (merged totals, details)."""
    import ray.data

    loc = locate(cfg.data)
    files = list_parquet_files(loc)
    label_columns = resolve_label_columns(specs, column_names(loc, files[0]), cfg.label_columns)
    needed = list(dict.fromkeys([*cfg.text_columns, *label_columns.values(), *cfg.slice_by]))
    inspect_parquet(loc, files, needed)
    ds = ray.data.read_parquet(files, filesystem=loc.arrow_fs()).select_columns(needed)
    per_block = ds.map_batches(
        _EvalActor,
        fn_constructor_kwargs=dict(
            files_ref=model_files_ref, specs=[s.to_dict() for s in specs], label_columns=label_columns,
            text_columns=cfg.text_columns, slice_by=cfg.slice_by, bins=cfg.threshold_bins,
            max_length=max_length, max_tokens_per_batch=cfg.max_tokens_per_batch or None, precision=cfg.precision,
            torch_threads=plan.torch_threads, with_uncalibrated=True,
        ),
        batch_size=cfg.block_rows, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.num_actors),
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
    )
    blocks = [json.loads(r["stats"]) for r in per_block.take_all()]
    devices = sorted({json.dumps(b.pop("device"), sort_keys=True) for b in blocks})
    return merge_block_statistics(specs, blocks), {"label_columns": label_columns, "devices": [json.loads(d) for d in devices]}


def specs_from_predictions(uri: str) -> tuple[list[HeadSpec], dict[str, Any]]:
    """Head specs and model identity from a scoring output's schema metadata."""
    import pyarrow.parquet as pq

    from pipelines.score.schema import read_metadata

    loc = locate(uri)
    files = list_parquet_files(loc)
    with loc.fs.open(files[0], "rb") as fh:
        meta = read_metadata(pq.ParquetFile(fh).schema_arrow)
    return [HeadSpec.from_dict(h["spec"]) for h in meta["heads"]], meta["model"]




def run_evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluates every head and writes the report directory; starts a local Ray if none is running.

    With neither ``data`` nor ``predictions``, evaluates the embedded default model on the
    embedded demo corpus's test split.

    Returns:
        The report (also written to ``<output>/report.json``, with ``report.md`` and PNGs).
    """
    import ray

    model_dir = None
    if cfg.predictions:
        specs, identity = specs_from_predictions(cfg.predictions)
    else:
        if not cfg.data:
            cfg = dataclasses.replace(cfg, data=str(default_corpus_dir() / "test.parquet"))
            log.info("no data given: evaluating on the embedded demo corpus %s", cfg.data)
        model_uri = cfg.model or str(default_model_dir())
        model_dir = localize_model(model_uri)
        specs = MultiTaskConfig.from_pretrained(model_dir).head_specs()
        identity = model_identity(model_dir, model_uri)
        model_files = shipped_model_files(model_dir, cfg.precision)

    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = cfg.progress
    if cfg.predictions:
        totals, details = evaluate_predictions(cfg, specs)
    else:
        plan = plan_inference(ray.cluster_resources(), num_actors=cfg.num_actors,
                              num_gpus_per_actor=0 if cfg.precision == "int8" else -1)
        max_length = cfg.max_length or MultiTaskConfig.from_pretrained(model_dir).max_seq_length
        totals, details = evaluate_data(cfg, specs, [ray.put(model_files)], max_length, plan)

    report = build_report(specs, totals, details["label_columns"], cfg.tune_thresholds)
    report["model"] = identity
    report["config"] = config_to_dict(cfg)
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
