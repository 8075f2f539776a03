"""Batch scoring on Ray Data: one streaming execution, CPU stages around the model, files committed as they finish.

    units (from input footers)
      -> read + join + tokenize      CPU tasks          (pipelines.score.stages)
      -> batch by tokens + forward   one actor per GPU  (pipelines.actor.InferenceActor)
      -> write + commit              CPU tasks          (the sink's write stage: pipelines.sink)
      -> the driver counts committed rows as they come, then verifies the output from storage

With ``from_embeddings`` (heads only), the source stage reads an earlier output's ``embedding``
column (:mod:`pipelines.score.heads_only`) and the actor runs only the heads; the rest is the same.

A kill at any moment loses only the rows in flight: a rerun skips every row already committed.
``run_score(cfg, inline=True)`` runs the same stages in this process without Ray (:mod:`pipelines.score.stream`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from mtcls import MultiTaskConfig, MultiTaskModel, encoder_identity, text_separator
from mtcls.profile import load_reference
from pipelines.actor import ScoredColumns
from pipelines.artifacts import localize_model, model_identity
from pipelines.blocks import PRECISION, PRECISION_TYPE, ROW, UNIT
from pipelines.config import ConfigError, check_max_length, config_to_dict
from pipelines.inference import shipped_model_files
from pipelines.metrics import CommitMetrics, collect_scoring_stats, new_stats_key, score_tags
from pipelines.progress import Progress
from pipelines.resources import ScoringPlan, plan_scoring
from pipelines.runtime import data_progress, init_ray
from pipelines.score.config import ScoreConfig
from pipelines.score.drift import drift_section, profile_section
from pipelines.score.dry_run import log_start
from pipelines.score.heads_only import EmbeddingSource, check_embedding_input, read_embeddings
from pipelines.score.stages import read_and_tokenize
from pipelines.score.stream import Stages, inline_batches, ray_batches
from pipelines.sink import make_sink
from pipelines.sink.base import Sink, Verification
from pipelines.sink.parquet import check_layout
from pipelines.sink.paths import check_apart
from pipelines.sink.records import checksum_file, id_type_ok
from pipelines.sink.schema import embedding_type, output_schema, selected_heads
from pipelines.sink.units import InputFile, Unit, plan_units
from pipelines.tokenize import ship_tokenizer
from pipelines.sources import InputSource, resolve_iceberg, resolve_input
from pipelines.storage import InputError, inspect_parquet, locate, redact_uri, redact_uris

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0


@dataclass
class _Plan:
    """What the driver settled before any work."""

    model_dir: Any
    model_config: MultiTaskConfig
    identity: dict[str, Any]
    schema: pa.Schema
    units: list[Unit]
    inputs: dict[str, InputFile]
    encoder: Optional[dict[str, Any]]
    max_length: int
    model_files: dict[str, bytes]
    source: InputSource


def run_score(cfg: ScoreConfig, inline: bool = False) -> dict[str, Any]:
    """Scores every input row not yet in the output, verifies the output and writes the manifest.

    Starts a local Ray if none is running. ``input`` and ``model`` must be given (``jobs.score``
    fills in the embedded demo corpus and default model when they are empty).

    Args:
        cfg: The job's configuration.
        inline: Run the stages in this process, one block after another, without Ray
            (:func:`pipelines.score.stream.inline_batches`): the same planning, sink, commits,
            verification and manifest, no parallelism. For debugging a stage and for tests.

    Returns:
        The manifest (also written to ``<output>/_manifest.json``).

    Raises:
        ConfigError: A key that cannot work with this input or model: before any work.
        InputError: Missing input, unreadable or corrupt Parquet, missing columns, an id column
            that cannot identify rows, or an output held by another live job: before any output
            is written.
        LockLostError: Another job took the output over; this job committed nothing after that.
    """
    started = time.time()
    if not (cfg.input or cfg.input_table) or not cfg.model:
        raise ConfigError(f"key '{'model' if cfg.input or cfg.input_table else 'input'}': run_score needs it (jobs.score fills "
                          f"in the embedded default)")
    plan = _plan(cfg)
    sink = make_sink(cfg, plan.schema)  # output_format: a Parquet directory or a Delta table
    if cfg.plan:  # a dry run: reads the output's commit records, takes no lease, writes nothing
        from pipelines.score.dry_run import dry_run

        return dry_run(cfg, plan, sink)
    with sink.open(cfg.overwrite, plan.inputs):
        resume = sink.resume(plan.units, plan.inputs)
        check_layout(resume.kept, plan.schema, sink.loc.uri())
        pending = [u for u in plan.units if u.pending_rows]
        if resume.stale or pending:
            sink.mark_incomplete()  # incomplete until the new rows are in
        if inline:
            cluster = {"CPU": float(os.cpu_count() or 1)}
        else:
            init_ray(cfg.verbose)
            import ray

            cluster = ray.cluster_resources()
        timings = {"setup_s": time.time() - started}
        score_started = time.time()
        resources = plan_scoring(cfg, cluster)
        log_start(cfg, plan, pending, resources)
        scored, used, metrics = _score_units(cfg, resources, plan, pending, sink, inline) if pending else (0, {}, {})
        timings["scoring_s"] = time.time() - score_started
        checksums = _local_checksums(cfg.id_column) if inline else _checksum_fanout(cfg.id_column)
        verification = sink.verify(plan.inputs, checksums)
        timings["verify_s"] = time.time() - score_started - timings["scoring_s"]
        timings["total_s"] = time.time() - started
        manifest = _manifest(cfg, plan, verification, scored, timings, resume.stale)
        manifest["resources"] = vars(resources)
        manifest["precision"] = {"requested": cfg.precision, "used_this_run": used}
        manifest["metrics"] = metrics  # this run's figures, as sent to the Ray metrics (pipelines.metrics)
        heads = output_heads(plan.model_config, plan.schema)
        # Scores are the heads' probabilities of logits / temperature (mtcls.calibration); none: uncalibrated.
        manifest["calibration"] = {s.name: s.temperature for s in heads if s.temperature is not None}
        if cfg.profile:
            manifest["profile"] = profile_section(heads, verification)
            manifest["drift"] = drift_section(heads, verification, load_reference(plan.model_dir), cfg.drift_threshold,
                                              redact_uri(cfg.model), cfg.drift_min_rows)
        sink.finish(manifest, verification)
    return manifest


def _plan(cfg: ScoreConfig) -> _Plan:
    """Everything that can fail on a bad config or input, checked before the output is touched."""
    model_dir = localize_model(cfg.model)
    passthrough = [cfg.id_column, *cfg.passthrough_columns]
    read = tuple(passthrough if cfg.from_embeddings else [*passthrough, *cfg.text_columns])
    if cfg.input_table:
        source_input = resolve_iceberg(cfg.input_table, cfg.input_snapshot, cfg.catalog, read)
        in_loc = source_input.loc
    else:
        in_loc = locate(cfg.input)
        source_input = resolve_input(in_loc, cfg.input_format, cfg.input_version, read)
    out_loc = locate(cfg.output)
    check_apart(in_loc, out_loc)
    files = source_input.files
    model_config = MultiTaskConfig.from_pretrained(model_dir)
    specs = selected_heads(model_config.head_specs(), cfg.heads)
    max_length = cfg.max_length or model_config.max_seq_length
    check_max_length(max_length, model_config.max_positions, bool(cfg.max_length))
    source = _embedding_source(cfg, in_loc, files, model_dir, model_config) if cfg.from_embeddings else None
    needed = list(dict.fromkeys([*passthrough, *(cfg.text_columns if source is None else [])]))
    in_schema, _ = inspect_parquet(in_loc, files, needed)
    id_type = in_schema.field(cfg.id_column).type
    if not id_type_ok(id_type):
        raise InputError(f"id column {cfg.id_column!r} is {id_type}: it cannot identify rows (an integer, string or binary "
                         f"column can); choose another id_column")
    identity = model_identity(model_dir, cfg.model)
    encoder = source.encoder if source else _encoder_identity(model_dir, max_length) if cfg.embeddings else None
    schema = output_schema(specs, pa.schema([in_schema.field(c) for c in passthrough]),
                           identity, cfg.text_columns if source is None else source.text_columns,
                           embedding=embedding_type(model_config.hidden_size, cfg.embedding_dtype) if cfg.embeddings else None,
                           encoder_identity=encoder)
    units, inputs = plan_units(in_loc, files, cfg.rows_per_file)
    # int8: the export runs here, once per encoder, so a model the route cannot handle fails before any output.
    model_files = shipped_model_files(model_dir, cfg.precision)
    return _Plan(model_dir, model_config, identity, schema, units, inputs, encoder, max_length, model_files, source_input)


def output_heads(model_config: MultiTaskConfig, schema: pa.Schema) -> list:
    """The model's heads that have columns in the output schema."""
    return [h for h in model_config.head_specs() if f"{h.name}_probs" in schema.names]


def _score_units(cfg: ScoreConfig, resources: ScoringPlan, plan: _Plan, pending: list[Unit],
                 sink: Sink, inline: bool) -> tuple[int, dict[str, str], dict[str, Any]]:
    """The streaming execution (:mod:`pipelines.score.stream`), committed as it goes.

    Returns:
        The rows committed by this run, ``{precision: why}`` as the actors reported them, and the
        run's metrics summary (:mod:`pipelines.metrics`).
    """
    tags = score_tags("score", redact_uri(cfg.output))
    stats_key = None if inline else new_stats_key()
    if inline:
        batches = inline_batches(_stages(cfg, resources, plan, pending, sink, put=lambda value: value))
    else:
        import ray
        import ray.data

        ctx = ray.data.DataContext.get_current()
        data_progress(cfg.progress and cfg.verbose)
        ctx.max_errored_blocks = 0  # an errored block would lose rows: fail instead
        ctx.raise_original_map_exception = True  # a stage's InputError (heads only: a vector's width) stays one
        batches = ray_batches(_stages(cfg, resources, plan, pending, sink, put=ray.put), resources,
                              metrics=dict(tags=tags, stats_key=stats_key))
    total = sum(u.pending_rows for u in pending)
    done, used = 0, {}
    progress = Progress("score", total, unit="rows", errors="error rows", every_s=PROGRESS_EVERY_S, logger=log)
    committed = CommitMetrics(tags, total)
    try:
        for batch in sink.iter_commits(_unwrap_input_errors(batches)):
            rows = int(pc.sum(batch.column("rows")).as_py() or 0)
            errors = int(pc.sum(batch.column("errors")).as_py() or 0) if "errors" in batch.column_names else 0
            done += rows
            for entries in batch.column("precision").to_pylist():
                used.update({p["name"]: p["reason"] for p in entries})
            progress.advance(rows, errors=errors)  # per committed batch of files: no per-row work
            committed.record(rows, errors, batch.num_rows, progress.rates()[0])
    finally:
        progress.close()
        actors = collect_scoring_stats(stats_key)
    return done, used, {**committed.summary(), **actors}


def _stages(cfg: ScoreConfig, resources: ScoringPlan, plan: _Plan, pending: list[Unit], sink: Sink,
            put: Callable[[Any], Any]) -> Stages:
    """The three stages' functions and arguments; ``put`` ships a large value to the workers (``ray.put``)."""
    files = list(plan.inputs)
    file_index = {p: i for i, p in enumerate(files)}
    unit_dicts = [{**u.to_dict(), "file": file_index[u.path]} for u in plan.units]
    index = {u.key: i for i, u in enumerate(plan.units)}
    internal = [pa.field(UNIT, pa.int32()), pa.field(ROW, pa.int64()), pa.field(PRECISION, PRECISION_TYPE)]
    carried = pa.schema(list(plan.schema) + internal, metadata=plan.schema.metadata)
    in_fs = plan.source.loc.fs
    engine = dict(torch_threads=resources.torch_threads, heads=cfg.heads or None)
    if cfg.from_embeddings:  # heads only: vectors instead of token ids, no tokenizer, no encoder
        source, inputs = read_embeddings, "pooled"
        source_kwargs = dict(units=unit_dicts, in_fs=in_fs, columns=list(dict.fromkeys([cfg.id_column, *cfg.passthrough_columns])),
                             width=plan.model_config.hidden_size, uris=[plan.inputs[p].uri for p in files])
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(plan.model_dir)
        source, inputs = read_and_tokenize, "tokens"
        source_kwargs = dict(units=unit_dicts, in_fs=in_fs,
                             columns=list(dict.fromkeys([cfg.id_column, *cfg.passthrough_columns, *cfg.text_columns])),
                             text_columns=cfg.text_columns, separator=text_separator(plan.model_config, tokenizer),
                             max_length=plan.max_length, tokenizer_ref=[put(ship_tokenizer(plan.model_dir))])
        engine.update(max_length=plan.max_length, max_tokens_per_batch=cfg.max_tokens_per_batch or None, precision=cfg.precision)
    profile_heads = [h.to_dict() for h in output_heads(plan.model_config, plan.schema)] if cfg.profile else None
    write, write_kwargs = sink.write_stage(plan.units, plan.inputs, plan.schema, profile_heads)
    return Stages(units=[index[u.key] for u in pending], source=source, source_kwargs=source_kwargs,
                  actor_kwargs=dict(files_ref=[put(plan.model_files)], inputs=inputs, output=ScoredColumns(carried), **engine),
                  write=write, write_kwargs=write_kwargs, block_rows=cfg.block_rows, rows_per_file=cfg.rows_per_file)


def _embedding_source(cfg: ScoreConfig, in_loc: Any, files: list[str], model_dir: Any, model_config: MultiTaskConfig) -> EmbeddingSource:
    """Heads-only scoring's checks before any work (:mod:`pipelines.score.heads_only`)."""
    model_encoder = encoder_identity(MultiTaskModel.from_pretrained(model_dir))
    return check_embedding_input(in_loc, files, model_encoder, model_config.hidden_size, cfg.max_length)


def _encoder_identity(model_dir: Any, max_length: int) -> dict[str, Any]:
    """:func:`mtcls.encoder_identity` of the model (loaded once, in the driver), with the token limit this job uses."""
    return {**encoder_identity(MultiTaskModel.from_pretrained(model_dir)), "max_length": max_length}


def _checksum_fanout(column: str) -> Any:
    """Reads the ids of Parquet files back from storage in Ray tasks, a few files per task."""

    def run(paths: list[tuple[Any, str]]) -> list[Any]:
        import ray

        # One task per CPU, none reserved: the reads must not wait for the actor pool's CPUs to come back.
        @ray.remote(num_cpus=0)
        def chunk(part: list[tuple[Any, str]]) -> list[Any]:
            return [checksum_file(fs, path, column) for fs, path in part]

        tasks = max(1, min(len(paths), int(ray.cluster_resources().get("CPU", 1))))
        size = -(-len(paths) // tasks)
        refs = [chunk.remote(paths[i:i + size]) for i in range(0, len(paths), size)]
        return [r for ref in refs for r in ray.get(ref)]

    return run


def _local_checksums(column: str) -> Any:
    """Reads the ids of Parquet files back from storage in this process."""
    return lambda paths: [checksum_file(fs, path, column) for fs, path in paths]


def _unwrap_input_errors(batches: Iterator[Any]) -> Iterator[Any]:
    """Iterates ``batches``; an :class:`InputError` raised in a stage (for example a vector's width)
    is re-raised with its own one-line message, not the remote traceback Ray wraps it in."""
    try:
        yield from batches
    except InputError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, InputError) and cause is not exc:
            message = cause.args[0] if cause.args and isinstance(cause.args[0], str) else str(cause)
            raise InputError(message.splitlines()[0] if message else message) from None
        raise


def _manifest(cfg: ScoreConfig, plan: _Plan, verification: Verification, scored: int, timings: dict[str, float],
              stale: list[str]) -> dict[str, Any]:
    rows_in = sum(f.rows for f in plan.inputs.values())
    return {
        "status": "complete" if not verification.problems and verification.rows_out == rows_in else "incomplete",
        "input": plan.source.name,
        "input_format": plan.source.format,
        "input_version": plan.source.version,
        "output": redact_uri(cfg.output),
        "model": plan.identity,
        **({"encoder": plan.encoder} if plan.encoder is not None else {}),
        "config": redact_uris(config_to_dict(cfg)),
        "schema": {f.name: str(f.type) for f in plan.schema},
        "rows_in": rows_in,
        "rows_out": verification.rows_out,
        "rows_error": verification.rows_error,
        "rows_truncated": verification.rows_truncated,
        "rows_scored_this_run": scored,
        "ids": {"null": verification.null_ids, "duplicate_within_file": verification.duplicate_ids},
        "input_files": {redact_uri(f.uri): f.rows for f in plan.inputs.values()},
        "output_files": len(verification.files),
        "verification": {"ids_checked": verification.rows_out, "problems": [str(p) for p in verification.problems],
                         "duplicate_files_removed": verification.duplicates_removed, "stale_files_removed": stale},
        "timings": timings,
        "rows_per_s_this_run": scored / timings["scoring_s"] if scored and timings["scoring_s"] > 0 else None,
    }

