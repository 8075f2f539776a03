"""The exactly-once writer: work units, a write stage, commit, verification from storage, finish.

A run composes a sink (see :class:`pipelines.sink.base.Sink`): it plans units and resumes from
what is committed, hands its write stage to Ray Data, verifies what is in storage, and finishes
(manifest, completion marker). Backends: the Parquet directory (:mod:`pipelines.sink.parquet`) and
the Delta Lake table (:mod:`pipelines.sink.delta`); :func:`make_sink` picks one from a job's config.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa


def make_sink(cfg: Any, schema: pa.Schema) -> Any:
    """The sink a scoring config asks for (``output_format``), on ``cfg.output``.

    Args:
        cfg: A :class:`pipelines.score.config.ScoreConfig` (``output``, ``output_format``, ``lock``,
            ``lock_timeout_s``, ``prune_missing``, ``commit_every_files``, ``commit_every_s``).
        schema: The output schema.

    Returns:
        A :class:`pipelines.sink.base.Sink`.

    Raises:
        InputError: A column the chosen format cannot store.
    """
    from pipelines.storage import locate

    loc = locate(cfg.output)
    owner = {"job": "score"}
    if cfg.output_format == "delta":
        from pipelines.sink.delta import DeltaSink

        return DeltaSink(loc, schema, lock=cfg.lock, lock_timeout_s=cfg.lock_timeout_s, prune_missing=cfg.prune_missing,
                         owner=owner, commit_every_files=cfg.commit_every_files, commit_every_s=cfg.commit_every_s)
    from pipelines.sink.parquet import ParquetSink

    return ParquetSink(loc, lock_timeout_s=cfg.lock_timeout_s, prune_missing=cfg.prune_missing, owner=owner)


def manifest_path(cfg: Any) -> str:
    """Where the run's manifest is: ``<output>/_manifest.json``, or ``<table>/_mtcls/manifest.json`` for Delta."""
    root = cfg.output.rstrip("/")
    return f"{root}/_mtcls/manifest.json" if cfg.output_format == "delta" else f"{root}/_manifest.json"
