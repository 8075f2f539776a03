"""Batch scoring on Ray Data: one streaming execution, CPU stages around the model, files committed as they finish.

    units (from input footers)
      -> read + join + tokenize      CPU tasks          (pipelines.score.stages)
      -> batch by tokens + forward   one actor per GPU  (pipelines.score.actor)
      -> write + commit              CPU tasks          (pipelines.score.stages)
      -> the driver counts committed rows as they come, then verifies the output from disk

With ``from_embeddings`` (heads only), the first two stages read an earlier output's ``embedding``
column and run only the heads on CPU actors (:mod:`pipelines.score.heads_only`); the rest is the same.

The output directory and its commit metadata are described in :mod:`pipelines.score.output`. A
kill at any moment loses only the rows in flight: a rerun skips every row already committed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from typing import Any, Optional

import pyarrow as pa

from mtcls import MultiTaskConfig, MultiTaskModel, encoder_identity, text_separator
from mtcls.profile import load_reference
from pipelines.artifacts import localize_model, model_identity
from pipelines.inference import shipped_model_files
from pipelines.demo.corpus import default_corpus_dir
from pipelines.demo.default_model import default_model_dir
from pipelines.resources import ScoringPlan, plan_scoring
from pipelines.runtime import init_ray
from pipelines.score.actor import InferenceActor
from pipelines.score.config import ScoreConfig
from pipelines.score.drift import drift_section, profile_section
from pipelines.score.lock import OutputLock
from pipelines.score.output import OutputDir, Verification, check_layout
from pipelines.score.records import checksum_file
from pipelines.score.heads_only import (EmbeddingSource, HeadsActor, check_apart, check_embedding_input, input_errors_unwrapped,
                                        read_embeddings)
from pipelines.score.schema import embedding_type, output_schema, selected_heads
from pipelines.score.stages import PRECISION, ROW, UNIT, read_and_tokenize, write_units
from pipelines.score.units import InputFile, plan_units
from pipelines.storage import inspect_parquet, list_parquet_files, locate, write_json

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0


def run_score(cfg: ScoreConfig) -> dict[str, Any]:
    """Scores every input row not yet in the output, verifies the output and writes the manifest.

    Starts a local Ray if none is running. An empty ``input`` scores the embedded demo corpus and an
    empty ``model`` uses the embedded default model (trained on first use).

    Returns:
        The manifest (also written to ``<output>/_manifest.json``).

    Raises:
        InputError: Missing input, unreadable or corrupt Parquet, missing columns, or an output
            held by another live job: before any output is written.
    """
    started = time.time()
    if not cfg.input:
        cfg = dataclasses.replace(cfg, input=str(default_corpus_dir() / "test.parquet"))
        log.info("no input given: scoring the embedded demo corpus %s", cfg.input)
    model_uri = cfg.model or str(default_model_dir())
    model_dir = localize_model(model_uri)
    in_loc, out_loc = locate(cfg.input), locate(cfg.output)
    files = list_parquet_files(in_loc)
    passthrough = [cfg.id_column, *cfg.passthrough_columns]
    model_config = MultiTaskConfig.from_pretrained(model_dir)
    specs = selected_heads(model_config.head_specs(), cfg.heads)
    # Heads-only (from_embeddings): the input's vectors must come from the model's encoder.
    source = _embedding_source(cfg, in_loc, out_loc, files, model_dir, model_config) if cfg.from_embeddings else None
    needed = list(dict.fromkeys([*passthrough, *(cfg.text_columns if source is None else [])]))
    in_schema, _ = inspect_parquet(in_loc, files, needed)
    identity = model_identity(model_dir, model_uri)
    encoder = source.encoder if source else _encoder_identity(cfg, model_dir, model_config) if cfg.embeddings else None
    schema = output_schema(specs, pa.schema([in_schema.field(c) for c in passthrough]),
                           identity, cfg.text_columns if source is None else source.text_columns,
                           embedding=embedding_type(model_config.hidden_size, cfg.embedding_dtype) if cfg.embeddings else None,
                           encoder_identity=encoder)
    units, inputs = plan_units(in_loc, files, cfg.rows_per_file)
    model_files = shipped_model_files(model_dir, cfg.precision)

    out = OutputDir(out_loc)
    out.check_owner(cfg.overwrite)
    with OutputLock(out_loc, timeout_s=cfg.lock_timeout_s, heartbeat_s=min(15.0, cfg.lock_timeout_s / 4)) as lock:
        out.prepare(cfg.overwrite)
        kept, stale = out.resume(units, inputs)
        check_layout(kept, schema, out_loc.uri())
        pending = [u for u in units if u.pending_rows]
        success = out_loc.join("_SUCCESS")
        if stale or pending:
            if out_loc.fs.exists(success.path):
                out_loc.fs.rm(success.path)  # incomplete until the new rows are in
        init_ray()
        import ray

        timings = {"setup_s": time.time() - started}
        score_started = time.time()
        plan = plan_scoring(cfg, ray.cluster_resources())
        scored, used = _score_units(cfg, plan, units, pending, inputs, in_loc, out, schema, model_dir, model_files, model_config) if pending else (0, {})
        timings["scoring_s"] = time.time() - score_started
        verification = out.verify(inputs, _checksum_fanout(cfg.id_column))
        timings["verify_s"] = time.time() - score_started - timings["scoring_s"]
        timings["total_s"] = time.time() - started
        manifest = _manifest(cfg, identity, schema, inputs, verification, scored, timings, stale, encoder)
        manifest["resources"] = vars(plan)
        manifest["precision"] = {"requested": cfg.precision, "used_this_run": used}
        # Scores are the heads' probabilities of logits / temperature (mtcls.calibration); none: uncalibrated.
        manifest["calibration"] = {s.name: s.temperature for s in output_heads(model_config, schema) if s.temperature is not None}
        if cfg.profile:
            heads = output_heads(model_config, schema)
            manifest["profile"] = profile_section(heads, verification)
            manifest["drift"] = drift_section(heads, verification, load_reference(model_dir), cfg.drift_threshold, model_uri)
        write_json(out_loc.join("_manifest.json"), manifest)
        if verification.problems or manifest["rows_out"] != manifest["rows_in"]:
            raise RuntimeError(
                f"output {out_loc.uri()} holds {manifest['rows_out']} rows for {manifest['rows_in']} input rows; "
                f"{'; '.join(verification.problems[:5])}; _SUCCESS not written (rerun to complete it)"
            )
        lock.check()
        with out_loc.fs.open(success.path, "w") as fh:
            fh.write("")
    return manifest


def output_heads(model_config: MultiTaskConfig, schema: pa.Schema) -> list:
    """The model's heads that have columns in the output schema."""
    return [h for h in model_config.head_specs() if f"{h.name}_probs" in schema.names]


def _score_units(cfg: ScoreConfig, plan: ScoringPlan, units: list, pending: list, inputs: dict[str, InputFile], in_loc: Any, out: OutputDir,
                 schema: pa.Schema, model_dir: Any, model_files: dict[str, bytes], model_config: MultiTaskConfig) -> tuple[int, dict[str, str]]:
    """The streaming execution.

    Returns:
        The rows committed by this run and ``{precision: why}`` as the actors reported them.
    """
    import ray
    import ray.data
    from transformers import AutoTokenizer

    log.info("%d of %d units to score (%d rows); plan: %s", len(pending), len(units),
             sum(u.pending_rows for u in pending), plan)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    ctx.max_errored_blocks = 0  # an errored block would lose rows: fail instead
    ctx.raise_original_map_exception = True  # a stage's InputError (heads only: a vector's width) stays one

    files = list(inputs)
    file_index = {p: i for i, p in enumerate(files)}
    unit_dicts = [{**u.to_dict(), "file": file_index[u.path]} for u in units]
    index = {u.key: i for i, u in enumerate(units)}
    internal = [pa.field(UNIT, pa.int32()), pa.field(ROW, pa.int64()), pa.field(PRECISION, pa.string())]
    carried = pa.schema(list(schema) + internal, metadata=schema.metadata)
    max_length = cfg.max_length or model_config.max_seq_length
    embedding_dtype = cfg.embedding_dtype if cfg.embeddings else None

    ds = ray.data.from_items([{"unit": index[u.key]} for u in pending], override_num_blocks=len(pending))
    if cfg.from_embeddings:  # heads only: vectors instead of token ids, no tokenizer, no encoder
        ds = ds.map_batches(
            read_embeddings, batch_size=1, batch_format="numpy", num_cpus=plan.cpu_stage_cpus,
            fn_kwargs=dict(units=unit_dicts, in_fs=in_loc.fs, columns=list(dict.fromkeys([cfg.id_column, *cfg.passthrough_columns])),
                           width=model_config.hidden_size, uris=[inputs[p].uri for p in files]),
        )
        actor, actor_kwargs = HeadsActor, dict(files_ref=[ray.put(model_files)], schema=carried, torch_threads=plan.torch_threads,
                                               heads=cfg.heads or None, embedding_dtype=embedding_dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tok_files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file() and not p.name.endswith(".safetensors")}
        digest = hashlib.sha1(b"".join(tok_files[k] for k in sorted(tok_files))).hexdigest()
        ds = ds.map_batches(
            read_and_tokenize, batch_size=1, batch_format="numpy", num_cpus=plan.cpu_stage_cpus,
            fn_kwargs=dict(units=unit_dicts, in_fs=in_loc.fs, columns=list(dict.fromkeys([cfg.id_column, *cfg.passthrough_columns, *cfg.text_columns])),
                           text_columns=cfg.text_columns, separator=text_separator(model_config, tokenizer),
                           max_length=max_length, tokenizer_ref=[ray.put((tok_files, digest))]),
        )
        actor, actor_kwargs = InferenceActor, dict(files_ref=[ray.put(model_files)], schema=carried, max_length=max_length,
                                                   max_tokens_per_batch=cfg.max_tokens_per_batch, torch_threads=plan.torch_threads,
                                                   precision=cfg.precision, embedding_dtype=embedding_dtype, heads=cfg.heads or None)
    ds = ds.map_batches(
        actor, batch_size=cfg.block_rows, batch_format="pyarrow", fn_constructor_kwargs=actor_kwargs,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.num_actors, max_tasks_in_flight_per_actor=2),
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
    )
    ds = ds.map_batches(
        write_units, batch_size=cfg.rows_per_file, batch_format="pyarrow", num_cpus=plan.cpu_stage_cpus,
        fn_kwargs=dict(units=unit_dicts, schema=schema, out_fs=out.loc.fs, out_root=out.loc.path, staging=out.staging.path,
                       input_uris=[inputs[p].uri for p in files], fingerprints=[inputs[p].fingerprint for p in files],
                       profile_heads=[h.to_dict() for h in output_heads(model_config, schema)] if cfg.profile else None),
    )
    total = sum(u.pending_rows for u in pending)
    done, started, last, used = 0, time.time(), time.time(), {}
    for batch in input_errors_unwrapped(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
        done += int(sum(batch.column("rows").to_pylist()))
        for entry in set("\n".join(batch.column("precision").to_pylist()).splitlines()):
            name, why = entry.split("\t", 1)
            used[name] = why
        if time.time() - last >= PROGRESS_EVERY_S:
            last = time.time()
            rate = done / max(last - started, 1e-9)
            log.info("committed %d of %d rows (%.0f%%), %.0f rows/s, about %.0f s left", done, total,
                     100 * done / max(total, 1), rate, (total - done) / max(rate, 1e-9))
    if log.isEnabledFor(logging.DEBUG):
        log.debug("Ray Data stage statistics:\n%s", ds.stats())
    return done, used


def _embedding_source(cfg: ScoreConfig, in_loc: Any, out_loc: Any, files: list[str], model_dir: Any,
                      model_config: MultiTaskConfig) -> EmbeddingSource:
    """Heads-only scoring's checks before any work (:mod:`pipelines.score.heads_only`)."""
    check_apart(in_loc, files, out_loc)
    model_encoder = encoder_identity(MultiTaskModel.from_pretrained(model_dir))
    return check_embedding_input(in_loc, files, model_encoder, model_config.hidden_size, cfg.max_length)


def _encoder_identity(cfg: ScoreConfig, model_dir: Any, model_config: MultiTaskConfig) -> dict[str, Any]:
    """:func:`mtcls.encoder_identity` of the model (loaded once, in the driver), with the token limit this job uses."""
    return {**encoder_identity(MultiTaskModel.from_pretrained(model_dir)),
            "max_length": cfg.max_length or model_config.max_seq_length}


def _checksum_fanout(column: str) -> Any:
    """Reads the ids of Parquet files back from storage in Ray tasks, a few files per task."""

    def run(paths: list[tuple[Any, str]]) -> list[tuple[int, int]]:
        import ray

        # One task per CPU, none reserved: the reads must not wait for the actor pool's CPUs to come back.
        @ray.remote(num_cpus=0)
        def chunk(part: list[tuple[Any, str]]) -> list[tuple[int, int]]:
            return [checksum_file(fs, path, column) for fs, path in part]

        tasks = max(1, min(len(paths), int(ray.cluster_resources().get("CPU", 1))))
        size = -(-len(paths) // tasks)
        refs = [chunk.remote(paths[i:i + size]) for i in range(0, len(paths), size)]
        return [r for ref in refs for r in ray.get(ref)]

    return run


def _manifest(cfg: ScoreConfig, identity: dict, schema: pa.Schema, inputs: dict[str, InputFile],
              verification: Verification, scored: int, timings: dict[str, float], stale: list[str],
              encoder: Optional[dict] = None) -> dict[str, Any]:
    rows_in = sum(f.rows for f in inputs.values())
    return {
        "status": "complete" if not verification.problems and verification.rows_out == rows_in else "incomplete",
        "input": cfg.input,
        "output": cfg.output,
        "model": identity,
        **({"encoder": encoder} if encoder is not None else {}),
        "config": dataclasses.asdict(cfg),
        "schema": {f.name: str(f.type) for f in schema},
        "rows_in": rows_in,
        "rows_out": verification.rows_out,
        "rows_error": verification.rows_error,
        "rows_truncated": verification.rows_truncated,
        "rows_scored_this_run": scored,
        "input_files": {f.uri: f.rows for f in inputs.values()},
        "output_files": len(verification.files),
        "verification": {"ids_checked": verification.rows_out, "problems": verification.problems,
                         "duplicate_files_removed": verification.duplicates_removed, "stale_files_removed": stale},
        "timings": timings,
        "rows_per_s_this_run": scored / timings["scoring_s"] if scored and timings["scoring_s"] > 0 else None,
    }
