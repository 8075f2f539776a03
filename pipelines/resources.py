"""Resource planning: how many inference actors, and what each reserves, so that no stage starves another.

On a GPU cluster there is one actor per GPU and the CPUs are left to reading, tokenizing and
writing. On CPUs only, actors take all CPUs but one: read and write tasks always keep a CPU, so a
2-CPU machine never deadlocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pipelines.config import ConfigError


@dataclass
class InferencePlan:
    """How many inference actors and what each reserves."""

    num_actors: int
    num_gpus: float
    num_cpus: float
    torch_threads: int


def plan_inference(cluster: dict[str, float], num_actors: int = 0, num_gpus_per_actor: float = -1,
                   num_cpus_per_actor: float = 1.0, torch_threads: int = 0) -> InferencePlan:
    """Sizes an inference actor pool for the cluster.

    Args:
        cluster: ``ray.cluster_resources()``.
        num_actors: Actors wanted; 0 plans them (one per GPU, else CPUs minus one).
        num_gpus_per_actor: GPUs per actor; -1 uses 1 when the cluster has GPUs, else 0.
        num_cpus_per_actor: CPUs Ray reserves per actor.
        torch_threads: CPU threads per actor; 0 shares the node's CPUs between the actors.

    Raises:
        ConfigError: Naming the key when the request cannot be met or would leave no CPU for
            reading and writing.
    """
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    num_gpus = num_gpus_per_actor if num_gpus_per_actor >= 0 else (1.0 if gpus > 0 else 0.0)
    if num_gpus > 0 and gpus < num_gpus:
        raise ConfigError(f"key 'num_gpus_per_actor': {num_gpus} requested but the cluster has {gpus} GPUs")
    if num_cpus_per_actor > max(cpus - 1, 0):
        raise ConfigError(
            f"key 'num_cpus_per_actor': {num_cpus_per_actor} leaves no CPU for reading and writing "
            f"on a cluster with {cpus:g} CPUs; use at most {max(cpus - 1, 0):g}"
        )
    if num_actors:
        n = num_actors
    elif num_gpus > 0:
        n = int(gpus // num_gpus)
    else:
        n = int((cpus - 1) // num_cpus_per_actor)
    budget = cpus - 1 if num_gpus == 0 else cpus
    if n * num_cpus_per_actor > budget:
        raise ConfigError(
            f"key 'num_actors': {n} actors x {num_cpus_per_actor:g} CPUs leave no CPU for reading and "
            f"writing on a cluster with {cpus:g} CPUs (the job would hang); use at most {int(budget // num_cpus_per_actor)}"
        )
    n = max(n, 1)
    threads = torch_threads or (max(1, (os.cpu_count() or 1) // n) if num_gpus == 0 else max(1, int(num_cpus_per_actor)))
    return InferencePlan(num_actors=n, num_gpus=num_gpus, num_cpus=num_cpus_per_actor, torch_threads=threads)


def plan_resources(cfg: Any, cluster: dict[str, float]) -> InferencePlan:
    """:func:`plan_inference` with the pool keys of a job config (``num_actors``, ``num_gpus_per_actor``, ...).

    ``precision=int8`` and heads-only scoring (``from_embeddings``) run on CPU actors: an
    automatic GPU count (-1) becomes 0.
    """
    cpu_only = cfg.precision == "int8" or getattr(cfg, "from_embeddings", False)
    gpus = 0 if cpu_only and cfg.num_gpus_per_actor < 0 else cfg.num_gpus_per_actor
    return plan_inference(cluster, cfg.num_actors, gpus, cfg.num_cpus_per_actor, cfg.torch_threads)


@dataclass
class ScoringPlan(InferencePlan):
    """An inference pool plus the CPUs each task of the CPU stages (read + tokenize, write) reserves."""

    cpu_stage_cpus: float = 1.0


def plan_scoring(cfg: Any, cluster: dict[str, float]) -> ScoringPlan:
    """The scoring job's plan: the inference pool of :func:`plan_resources`, and the CPU stages.

    The CPU stages get whatever the actors leave. With a single CPU left (a 2-CPU machine with
    one actor) each of the two CPU stages reserves half of it, so reading, tokenizing, inference
    and writing can all run at once and the job never waits on a stage that cannot be scheduled.
    """
    pool = plan_resources(cfg, cluster)
    return ScoringPlan(**vars(pool), cpu_stage_cpus=cpu_stage_cpus(cluster, pool))


def cpu_stage_cpus(cluster: dict[str, float], pool: InferencePlan) -> float:
    """CPUs each task of a CPU stage reserves next to the pool: 1, or 0.5 when only one CPU is left for two stages."""
    left = float(cluster.get("CPU", 1)) - pool.num_actors * pool.num_cpus
    return 1.0 if left >= 2 else 0.5
