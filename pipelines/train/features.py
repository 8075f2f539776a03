"""Cached features for a frozen encoder: every row's pooled encoder output, computed once.

With ``freeze_encoder`` the encoder is a fixed function (eval mode, no updates), so the features
the heads read for a row are the same in every epoch. :func:`cache_features` computes them in one
distributed Ray Data stage (the pipelines' one :class:`pipelines.actor.InferenceActor`, with
token-id input and :class:`pipelines.actor.PooledFeatures` output; one GPU per actor on a GPU
cluster) and materializes the result in the object store. The training loop then
reads ``features`` instead of ``input_ids`` and runs only the heads (``forward_heads``); the
encoder never runs on a training worker, yet stays in the model that is checkpointed and exported.

What keeps a cached run equal to an uncached one:

- Same precision: training features are computed under training's autocast rule
  (:func:`mtcls.precision.training_autocast`), validation features in fp32 (uncached
  validation runs without autocast).
- Same batches: each input block becomes exactly one output block, in order (``preserve_order``,
  no block splitting), and every row keeps its ``row`` number and labels and gains ``length`` (its
  token count), so the local shuffle, the length grouping and the DDP split cut the same batches.
- Same random numbers: the encoder in eval mode draws none, so the heads' dropout sees the same
  draws.

Only padding differs (features are computed in length-sorted token-budget batches), which changes
features in the last float bits (fp32) or by bf16 rounding under bf16 autocast.

Memory: ``rows x hidden size x 4`` bytes per split in the object store (spilled to disk when
full); the driver holds only references.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipelines.actor import InferenceActor, PooledFeatures, TokenIds

log = logging.getLogger(__name__)

FEATURES = "features"
LENGTH = "length"


def cache_features(datasets: dict[str, Any], files_ref: list, precision: str, use_gpu: bool, num_workers: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replaces ``input_ids`` by pooled features in every dataset, materialized in the object store.

    Args:
        datasets: ``{"train": ..., "validation": ...}`` Ray Datasets of prepared rows.
        files_ref: The starting model's files in the object store.
        precision: Training's ``precision`` key (validation features are always fp32).
        use_gpu: One GPU per actor (``num_workers`` actors: the GPUs training will use next).
        num_workers: Training workers.

    Returns:
        The materialized datasets, and what the pass cost: ``{"seconds", "rows", "bytes"}``.
    """
    import ray
    import ray.data

    from pipelines.resources import plan_inference

    if use_gpu:
        actors, gpus, cpus, threads = num_workers, 1.0, 1.0, 2
    else:
        plan = plan_inference(ray.cluster_resources(), num_gpus_per_actor=0)
        actors, gpus, cpus, threads = plan.num_actors, 0.0, plan.num_cpus, plan.torch_threads
    start = time.perf_counter()
    out = {}
    for split, ds in datasets.items():
        # One output block per input block, in input order: the batches cut from them are then
        # those of an uncached run (see the module docstring).
        ds.context.execution_options.preserve_order = True
        ds.context.target_max_block_size = None
        out[split] = ds.map_batches(
            InferenceActor,
            fn_constructor_kwargs=dict(files_ref=files_ref, inputs=TokenIds("input_ids"), output=PooledFeatures("input_ids"),
                                       training_precision=precision if split == "train" else "fp32", torch_threads=threads),
            batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors), num_cpus=cpus, num_gpus=gpus,
        ).materialize()
    cost = {"seconds": time.perf_counter() - start, "rows": sum(ds.count() for ds in out.values()),
            "bytes": sum(ds.size_bytes() for ds in out.values())}
    log.info("cached features of %d rows in %.1f s (%.1f MB in the object store)", cost["rows"], cost["seconds"], cost["bytes"] / 1e6)
    return out, cost
