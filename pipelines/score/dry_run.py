"""What a scoring run is about to do: its start summary, and ``plan=true``, a dry run.

Reads the input's footers and the output's commit records (no lease is taken, nothing is written,
removed or moved), plans the resources from the cluster, and times a short forward pass of the
first pending unit's first rows in the driver, through the same source stage and inference actor
code the job runs, to estimate how long the pending rows take.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.blocks import PRECISION, PRECISION_TYPE, ROW, UNIT
from pipelines.resources import ScoringPlan, plan_scoring
from pipelines.runtime import init_ray
from pipelines.score.config import ScoreConfig
from pipelines.sink.units import Unit
from pipelines.storage import InputError, redact_uri

log = logging.getLogger(__name__)

#: Rows of the first pending unit timed through the model (after a warm-up of :data:`WARMUP_ROWS`).
SAMPLE_ROWS = 256
WARMUP_ROWS = 16


def dry_run(cfg: ScoreConfig, plan: Any, sink: Any) -> dict[str, Any]:
    """The plan of a scoring run, without running it.

    Args:
        cfg: The job's config (``plan=true``).
        plan: What :func:`pipelines.score.run._plan` settled (units, inputs, schema, model).
        sink: The output's sink; only its commit records are read.

    Returns:
        ``{"plan": true, inputs, rows, units, rows committed and pending, resources, estimate}``.
    """
    rows = sum(f.rows for f in plan.inputs.values())
    problem, stale = None, 0
    if not cfg.overwrite:  # overwrite=true: the run deletes the output first and scores every row
        try:
            stale = _mark_committed(sink, plan)
        except InputError as exc:  # the run would refuse before any work: say why
            problem = str(exc)
    pending = [u for u in plan.units if u.pending_rows]
    left = sum(u.pending_rows for u in pending)
    init_ray(cfg.verbose)
    import ray

    resources = plan_scoring(cfg, ray.cluster_resources())
    log_start(cfg, plan, pending, resources)
    estimate = _estimate(cfg, plan, pending, resources) if pending and problem is None else None
    out = {
        "plan": True,
        "input": plan.source.name,
        "input_format": plan.source.format,
        "input_version": plan.source.version,
        "output": redact_uri(cfg.output),
        "output_format": getattr(cfg, "output_format", "parquet"),
        "model": plan.identity,
        "input_files": {redact_uri(f.uri): f.rows for f in plan.inputs.values()},
        "rows": rows,
        "units": len(plan.units),
        "units_pending": len(pending),
        "rows_committed": rows - left,
        "rows_pending": left,
        "stale_files": stale,
        "overwrite": cfg.overwrite,
        "resources": vars(resources),
        "estimate": estimate,
    }
    if problem:
        out["refused"] = problem
    return out


def log_start(cfg: ScoreConfig, plan: Any, pending: list[Unit], resources: ScoringPlan) -> None:
    """The job's start summary: inputs, rows, pending rows, the resource plan, the output (one line)."""
    rows = sum(f.rows for f in plan.inputs.values())
    left = sum(u.pending_rows for u in pending)
    logging.getLogger("pipelines.score").info(
        "score %s (%s%d files, %d rows) -> %s: %d rows pending in %d of %d units; %d actors x (%g CPU, %g GPU), "
        "%d torch threads each, precision %s", plan.source.name,
        {"delta": f"Delta table version {plan.source.version}, ", "iceberg": f"snapshot {plan.source.version}, "}.get(plan.source.format, ""),
        len(plan.inputs), rows,
        redact_uri(cfg.output),
        left, len(pending), len(plan.units), resources.num_actors, resources.num_cpus, resources.num_gpus,
        resources.torch_threads, cfg.precision)


def _mark_committed(sink: Any, plan: Any) -> int:
    """Marks each unit's rows the output already holds, from its commit records, read only.

    Returns:
        Committed files of input files whose content changed (a run removes and rescores them).

    Raises:
        InputError: What the run would refuse before any work: rows of input files the input no
            longer lists (without ``prune_missing``), or files written with other columns or another model.
    """
    from pipelines.sink.base import mark_done, missing_inputs
    from pipelines.sink.parquet import check_layout

    files = _committed(sink)
    missing_inputs(files, plan.inputs, getattr(sink, "prune_missing", False), sink.loc.uri())
    current = {(f.uri, f.fingerprint) for f in plan.inputs.values()}
    kept = [f for f in files if f.source in current]
    check_layout(kept, plan.schema, sink.loc.uri())
    mark_done(plan.units, kept, plan.inputs)
    return len(files) - len(kept)


def _committed(sink: Any) -> list:
    """The sink's committed files, read without a lease (Parquet: the footers; Delta: the table's records)."""
    if hasattr(sink, "live"):  # a Delta table
        dt = sink.table()
        return sink.live(dt) if dt is not None else []
    return sink.committed()


def _estimate(cfg: ScoreConfig, plan: Any, pending: list[Unit], resources: ScoringPlan) -> dict[str, Any]:
    """Times the first pending unit's first rows through the source stage and the inference actor, in the driver."""
    import torch

    from pipelines.actor import InferenceActor, ScoredColumns

    first = pending[0]
    files = list(plan.inputs)
    sample = {**first.to_dict(), "file": files.index(first.path), "rows": min(first.rows, SAMPLE_ROWS + WARMUP_ROWS), "done": []}
    in_fs = plan.source.loc.fs
    threads = torch.get_num_threads()
    started = time.perf_counter()
    try:
        block, inputs, engine = _sample_block(cfg, plan, sample, in_fs, resources)
        read_s = time.perf_counter() - started
        internal = [pa.field(UNIT, pa.int32()), pa.field(ROW, pa.int64()), pa.field(PRECISION, PRECISION_TYPE)]
        carried = pa.schema(list(plan.schema) + internal, metadata=plan.schema.metadata)
        actor = InferenceActor([plan.model_files], inputs, ScoredColumns(carried), **engine)
        warm = min(WARMUP_ROWS, max(block.num_rows - 1, 0))
        if warm:
            actor(block.slice(0, warm))
        timed = block.slice(warm)
        t0 = time.perf_counter()
        actor(timed)
        forward_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    rate = timed.num_rows / forward_s if forward_s > 0 and timed.num_rows else None
    left = sum(u.pending_rows for u in pending)
    device = actor.engine.device.type
    estimate = {
        "sample_rows": int(timed.num_rows),
        "device": device,
        "precision": actor.precision["name"],
        "torch_threads": resources.torch_threads,
        "rows_per_s_per_actor": round(rate, 1) if rate else None,
        "actors": resources.num_actors,
        "seconds": round(left / (rate * resources.num_actors), 3) if rate else None,
        "read_and_tokenize_s": round(read_s, 3),
    }
    if resources.num_gpus and device != "cuda":
        estimate["note"] = "measured on the driver's CPU; the GPU actors are faster, so the estimate is an upper bound"
    return estimate


def _sample_block(cfg: ScoreConfig, plan: Any, unit: dict[str, Any], in_fs: Any,
                  resources: ScoringPlan) -> tuple[pa.Table, str, dict[str, Any]]:
    """The sample unit's block from the job's own source stage, the actor's input kind and engine arguments."""
    import ray

    engine: dict[str, Any] = dict(torch_threads=resources.torch_threads, heads=cfg.heads or None)
    batch = {"unit": np.array([0])}
    if cfg.from_embeddings:
        from pipelines.score.heads_only import read_embeddings

        block = read_embeddings(batch, units=[unit], in_fs=in_fs, columns=list(dict.fromkeys([cfg.id_column, *cfg.passthrough_columns])),
                                width=plan.model_config.hidden_size, uris=[plan.inputs[p].uri for p in plan.inputs])
        return block, "pooled", engine
    from transformers import AutoTokenizer

    from mtcls import text_separator
    from pipelines.score.stages import read_and_tokenize
    from pipelines.tokenize import ship_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(plan.model_dir)
    block = read_and_tokenize(batch, units=[unit], in_fs=in_fs,
                              columns=list(dict.fromkeys([cfg.id_column, *cfg.passthrough_columns, *cfg.text_columns])),
                              text_columns=cfg.text_columns, separator=text_separator(plan.model_config, tokenizer),
                              max_length=plan.max_length, tokenizer_ref=[ray.put(ship_tokenizer(plan.model_dir))])
    engine.update(max_length=plan.max_length, max_tokens_per_batch=cfg.max_tokens_per_batch or None, precision=cfg.precision)
    return block, "tokens", engine
