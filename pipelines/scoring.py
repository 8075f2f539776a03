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

import hashlib
import logging
import os
import posixpath
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mtcls import MultiTaskConfig
from pipelines.config import ConfigError
from pipelines.schema import ERROR_COLUMN, TRUNCATED_COLUMN, output_schema
from pipelines.storage import InputError, Location, inspect_parquet, list_parquet_files, locate, read_json, write_json

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class ScoreConfig:
    """Config of ``jobs.score``. Every key can be set in YAML or as ``key=value``.

    Attributes:
        input: Parquet file or directory, any fsspec URI. Empty: the embedded demo corpus.
        output: Output directory URI.
        model: Saved model directory (local or URI). Empty: the embedded default model.
        text_columns: Columns joined (with the tokenizer's separator) into the text to classify.
        id_column: Row identifier, copied first into the output.
        passthrough_columns: Further input columns copied into the output.
        max_length: Token limit per row; 0 uses the model's ``max_seq_length``.
        batch_size: Rows per forward pass, after length-sorting each block.
        block_rows: Rows per actor call (the unit of length sorting).
        num_actors: Inference actors; 0 plans from the cluster (one per GPU, else CPUs minus one).
        num_gpus_per_actor: GPUs per actor; -1 uses 1 when the cluster has GPUs, else 0.
        num_cpus_per_actor: CPUs Ray reserves per actor.
        torch_threads: CPU threads per actor for inference; 0 = all CPUs of the node (see README).
        precision: ``auto`` (bf16/fp16 autocast on GPU, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``.
        rows_per_file: Target rows per output file (no flood of tiny files).
        wave_rows: Rows per commit unit; a killed job redoes at most one wave.
        overwrite: Delete any existing output first (otherwise a rerun resumes).
        progress: Show Ray Data progress bars.
    """

    input: str = ""
    output: str = "outputs/score"
    model: str = ""
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    id_column: str = "id"
    passthrough_columns: list[str] = field(default_factory=list)
    max_length: int = 0
    batch_size: int = 64
    block_rows: int = 4096
    num_actors: int = 0
    num_gpus_per_actor: float = -1
    num_cpus_per_actor: float = 1.0
    torch_threads: int = 0
    precision: str = "auto"
    rows_per_file: int = 100_000
    wave_rows: int = 1_000_000
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.output:
            raise ConfigError("key 'output': an output directory is required")
        if not self.text_columns:
            raise ConfigError("key 'text_columns': at least one text column is required")
        if not self.id_column:
            raise ConfigError("key 'id_column': an id column is required (rows are matched by id, never by order)")
        for key in ("batch_size", "block_rows", "rows_per_file", "wave_rows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key {key!r}: must be >= 1, got {getattr(self, key)}")
        for key in ("max_length", "num_actors", "torch_threads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"key {key!r}: must be >= 0, got {getattr(self, key)}")
        if self.num_cpus_per_actor <= 0:
            raise ConfigError(f"key 'num_cpus_per_actor': must be > 0, got {self.num_cpus_per_actor}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"key 'precision': expected one of {list(PRECISIONS)}, got {self.precision!r}")
        dup = [c for c in self.passthrough_columns if c == self.id_column or c in self.text_columns]
        if dup:
            raise ConfigError(f"key 'passthrough_columns': {dup} already in id_column or text_columns")


@dataclass
class ResourcePlan:
    """How many inference actors and what each reserves."""

    num_actors: int
    num_gpus: float
    num_cpus: float
    torch_threads: int


def plan_resources(cfg: ScoreConfig, cluster: dict[str, float]) -> ResourcePlan:
    """Sizes the actor pool so read and write tasks always keep a CPU (no deadlock on 2 CPUs).

    Args:
        cfg: The job config.
        cluster: ``ray.cluster_resources()``.

    Returns:
        The plan. GPU clusters: one actor per GPU. CPU: actors fill all CPUs but one.
    """
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    num_gpus = cfg.num_gpus_per_actor if cfg.num_gpus_per_actor >= 0 else (1.0 if gpus > 0 else 0.0)
    if num_gpus > 0 and gpus < num_gpus:
        raise ConfigError(f"key 'num_gpus_per_actor': {num_gpus} requested but the cluster has {gpus} GPUs")
    if cfg.num_cpus_per_actor > max(cpus - 1, 0):
        raise ConfigError(
            f"key 'num_cpus_per_actor': {cfg.num_cpus_per_actor} leaves no CPU for reading and writing "
            f"on a cluster with {cpus:g} CPUs; use at most {max(cpus - 1, 0):g}"
        )
    if cfg.num_actors:
        n = cfg.num_actors
    elif num_gpus > 0:
        n = int(gpus // num_gpus)
    else:
        n = int((cpus - 1) // cfg.num_cpus_per_actor)
    budget = cpus - 1 if num_gpus == 0 else cpus
    if n * cfg.num_cpus_per_actor > budget:
        raise ConfigError(
            f"key 'num_actors': {n} actors x {cfg.num_cpus_per_actor:g} CPUs leave no CPU for reading and "
            f"writing on a cluster with {cpus:g} CPUs (the job would hang); use at most {int(budget // cfg.num_cpus_per_actor)}"
        )
    threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // max(n, 1) if num_gpus == 0 else int(cfg.num_cpus_per_actor))
    return ResourcePlan(num_actors=max(n, 1), num_gpus=num_gpus, num_cpus=cfg.num_cpus_per_actor, torch_threads=threads)


def model_identity(model_dir: Path, uri: str) -> dict[str, Any]:
    """Where the model came from and a hash of its weights (the ``model`` field of metadata)."""
    digest = hashlib.sha256()
    weights = sorted(model_dir.glob("*.safetensors"))
    for w in weights:
        with open(w, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    config = MultiTaskConfig.from_pretrained(model_dir)
    return {
        "uri": uri,
        "weights_sha256": digest.hexdigest(),
        "encoder": config.encoder_name,
        "encoder_type": config.encoder.get("model_type"),
        "heads": [h["name"] for h in config.heads],
    }


def localize_model(uri: str) -> Path:
    """A local copy of a model directory (downloaded once per process when remote)."""
    loc = locate(uri)
    if loc.protocol == "file":
        path = Path(loc.path)
        if not (path / "config.json").is_file():
            raise InputError(f"model directory {uri!r} has no config.json (is it a saved mtcls model?)")
        return path
    target = Path(tempfile.mkdtemp(prefix="mtcls-model-"))
    if not loc.fs.exists(posixpath.join(loc.path, "config.json")):
        raise InputError(f"model directory {uri!r} has no config.json (is it a saved mtcls model?)")
    loc.fs.get(loc.path.rstrip("/") + "/", str(target), recursive=True)
    return target


def read_model_files(model_dir: Path) -> dict[str, bytes]:
    """The files of a model directory, to ship to actors through the object store."""
    return {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}


def materialize_model_files(files: dict[str, bytes]) -> str:
    """Writes files from :func:`read_model_files` into a new local directory; returns its path."""
    target = Path(tempfile.mkdtemp(prefix="mtcls-model-"))
    for name, data in files.items():
        (target / name).write_bytes(data)
    return str(target)


class _ShippedPredictor:
    """Predictor whose model files arrive through the object store, so any node can load them."""

    def __init__(self, files_ref: list, **kwargs: Any) -> None:
        import ray

        from pipelines.predictor import Predictor

        self._inner = Predictor(materialize_model_files(ray.get(files_ref[0])), **kwargs)

    def __call__(self, batch: Any) -> Any:
        return self._inner(batch)


@dataclass
class Wave:
    """One commit unit: some input files, their row count, and a unique name."""

    name: str
    files: list[str]
    rows: int


def plan_waves(pending: dict[str, int], wave_rows: int) -> list[Wave]:
    """Groups pending input files (path -> rows) into waves of about ``wave_rows`` rows."""
    waves: list[Wave] = []
    current: list[str] = []
    rows = 0
    for path, n in pending.items():
        if current and rows + n > wave_rows:
            waves.append(Wave(uuid.uuid4().hex[:12], current, rows))
            current, rows = [], 0
        current.append(path)
        rows += n
    if current:
        waves.append(Wave(uuid.uuid4().hex[:12], current, rows))
    return waves


class OutputDir:
    """The output directory and its commit records."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc
        self.records = loc.join("_mtcls", "waves")
        self.staging = loc.join("_mtcls", "staging")

    def prepare(self, overwrite: bool) -> None:
        fs = self.loc.fs
        if overwrite and fs.exists(self.loc.path):
            fs.rm(self.loc.path, recursive=True)
        if fs.exists(self.loc.path) and fs.ls(self.loc.path) and not fs.exists(self.loc.join("_mtcls").path):
            raise InputError(
                f"output directory {self.loc.uri()!r} is not empty and was not written by mtcls; "
                "choose another output or set overwrite=true"
            )
        fs.makedirs(self.records.path, exist_ok=True)

    def wave_records(self) -> list[dict[str, Any]]:
        fs = self.loc.fs
        if not fs.exists(self.records.path):
            return []
        paths = sorted(p for p in fs.ls(self.records.path, detail=False) if p.endswith(".json"))
        return [read_json(Location(fs, p, self.loc.protocol)) for p in paths]

    def recover(self) -> list[dict[str, Any]]:
        """Finishes interrupted commits and drops unrecorded staging; returns committed records."""
        fs = self.loc.fs
        records = self.wave_records()
        for rec in records:
            if rec["state"] == "committing":
                self._move(rec)
        known = {rec["wave"] for rec in records}
        if fs.exists(self.staging.path):
            for path in fs.ls(self.staging.path, detail=False):
                if posixpath.basename(path) not in known:
                    log.info("discarding unfinished wave %s", path)
                    fs.rm(path, recursive=True)
        return records

    def commit(self, wave: Wave, staged: list[str], counts: dict[str, int]) -> dict[str, Any]:
        record = {
            "wave": wave.name,
            "state": "committing",
            "inputs": wave.files,
            "rows": wave.rows,
            "files": [f"part-{wave.name}-{i:05d}.parquet" for i in range(len(staged))],
            "staged": [posixpath.basename(p) for p in staged],
            **counts,
        }
        write_json(self.records.join(f"{wave.name}.json"), record)
        self._move(record)
        return record

    def _move(self, record: dict[str, Any]) -> None:
        fs = self.loc.fs
        stage = self.staging.join(record["wave"])
        for staged_name, name in zip(record["staged"], record["files"]):
            src = stage.join(staged_name).path
            dst = self.loc.join(name).path
            if fs.exists(src):
                fs.mv(src, dst)
            elif not fs.exists(dst):
                raise RuntimeError(f"commit record {record['wave']} lists {name} but it is neither staged nor in place")
        if fs.exists(stage.path):
            fs.rm(stage.path, recursive=True)
        record["state"] = "done"
        write_json(self.records.join(f"{record['wave']}.json"), record)


def count_output(loc: Location, files: list[str]) -> dict[str, int]:
    """Rows, error rows and truncated rows in written files (reads two small columns)."""
    rows = errors = truncated = 0
    for path in files:
        with loc.fs.open(path, "rb") as fh:
            table = pq.read_table(fh, columns=[ERROR_COLUMN, TRUNCATED_COLUMN])
        rows += table.num_rows
        errors += table.num_rows - table.column(ERROR_COLUMN).null_count
        truncated += sum(1 for v in table.column(TRUNCATED_COLUMN).to_pylist() if v)
    return {"rows_out": rows, "rows_error": errors, "rows_truncated": truncated}


def run_scoring(cfg: ScoreConfig, model_dir: Path, model_uri: str) -> dict[str, Any]:
    """Scores every pending input file and writes the manifest. Ray must be initialised.

    Args:
        cfg: Validated config (``input`` and ``model`` already resolved to real locations).
        model_dir: Local copy of the model directory.
        model_uri: The model's URI as the user gave it (recorded in the manifest).

    Returns:
        The manifest (also written to ``<output>/_manifest.json``).

    Raises:
        InputError: Missing input, unreadable or corrupt Parquet, missing columns: before any output.
    """
    import ray
    import ray.data

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
            _ShippedPredictor,
            fn_constructor_kwargs=dict(
                files_ref=files_ref,
                schema=schema,
                text_columns=cfg.text_columns,
                max_length=cfg.max_length or model_config.max_seq_length,
                batch_size=cfg.batch_size,
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
