"""The scoring job's three stages, and the two ways to run them.

    source (read + tokenize, or read pooled vectors)  ->  InferenceActor  ->  the sink's write stage

:func:`ray_batches` streams them through Ray Data (CPU tasks, an actor pool, CPU tasks): the job.
:func:`inline_batches` calls the same functions and the same actor class in this process, one block
after another, with the same batch sizes: for stepping through a stage in a debugger, and for the
unit tests of everything around the stages. It has no parallelism and needs no Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from pipelines.actor import InferenceActor
from pipelines.resources import ScoringPlan

log = logging.getLogger(__name__)


@dataclass
class Stages:
    """What each stage runs, with its arguments; built once by the job, run by either executor.

    Attributes:
        units: Indices of the units to score (the source stage's input, one per block).
        source: ``map_batches`` function from ``{"unit": indices}`` to a block of rows.
        source_kwargs: Its keyword arguments.
        actor_kwargs: :class:`~pipelines.actor.InferenceActor` arguments, but ``metrics``.
        write: The sink's write stage (:meth:`pipelines.sink.base.Sink.write_stage`).
        write_kwargs: Its keyword arguments.
        block_rows: Rows per batch handed to the actor.
        rows_per_file: Rows per batch handed to the write stage.
    """

    units: list[int]
    source: Callable[..., pa.Table]
    source_kwargs: dict[str, Any]
    actor_kwargs: dict[str, Any]
    write: Callable[..., pa.Table]
    write_kwargs: dict[str, Any]
    block_rows: int
    rows_per_file: int


def ray_batches(stages: Stages, resources: ScoringPlan, metrics: dict[str, Any]) -> Iterator[pa.Table]:
    """Runs the stages as one Ray Data streaming execution and yields the write stage's batches.

    Args:
        stages: What to run.
        resources: CPUs and GPUs of the actor pool and the CPU stages.
        metrics: The actors' ``metrics`` argument (tags and stats key).
    """
    import ray.data

    ds = ray.data.from_items([{"unit": i} for i in stages.units], override_num_blocks=len(stages.units))
    ds = ds.map_batches(stages.source, batch_size=1, batch_format="numpy", num_cpus=resources.cpu_stage_cpus,
                        fn_kwargs=stages.source_kwargs)
    ds = ds.map_batches(
        InferenceActor, batch_size=stages.block_rows, batch_format="pyarrow",
        fn_constructor_kwargs={**stages.actor_kwargs, "metrics": metrics},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=resources.num_actors, max_tasks_in_flight_per_actor=2),
        num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
    )
    ds = ds.map_batches(stages.write, batch_size=stages.rows_per_file, batch_format="pyarrow",
                        num_cpus=resources.cpu_stage_cpus, fn_kwargs=stages.write_kwargs)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
    if log.isEnabledFor(logging.DEBUG):
        log.debug("Ray Data stage statistics:\n%s", ds.stats())


def inline_batches(stages: Stages) -> Iterator[pa.Table]:
    """Runs the stages in this process, unit after unit, and yields the write stage's batches.

    One actor object serves every block; batches are cut to ``block_rows`` and ``rows_per_file``
    rows across unit boundaries, as Ray Data cuts them.
    """
    actor = InferenceActor(**stages.actor_kwargs)
    blocks = (stages.source({"unit": np.array([i])}, **stages.source_kwargs) for i in stages.units)
    scored = (actor(batch) for batch in rebatch(blocks, stages.block_rows))
    for batch in rebatch(scored, stages.rows_per_file):
        yield stages.write(batch, **stages.write_kwargs)


def rebatch(tables: Iterable[pa.Table], size: int) -> Iterator[pa.Table]:
    """The rows of ``tables`` in order, in batches of ``size`` rows (the last one shorter)."""
    held: list[pa.Table] = []
    rows = 0
    for table in tables:
        held.append(table)
        rows += table.num_rows
        while rows >= size:
            joined = pa.concat_tables(held)
            yield joined.slice(0, size)
            rest = joined.slice(size)
            held, rows = ([rest] if rest.num_rows else []), rest.num_rows
    if rows:
        yield pa.concat_tables(held)
