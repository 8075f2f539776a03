"""Cached features for a frozen encoder: every row's pooled encoder output, computed once.

With ``freeze_encoder`` the encoder is a fixed function (eval mode, no updates), so the features
the heads read for a row are the same in every epoch. :func:`cache_features` computes them in one
distributed Ray Data stage (an actor pool running the project's inference engine, one GPU per
actor on a GPU cluster) and materializes the result in the object store. The training loop then
reads ``features`` instead of ``input_ids`` and runs only the heads (``forward_heads``); the
encoder never runs on a training worker, yet stays in the model that is checkpointed and exported.

What keeps a cached run equal to an uncached one:

- Same precision: training features are computed under training's autocast rule
  (:func:`pipelines.train.precision.training_autocast`), validation features in fp32 (uncached
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

import numpy as np
import pyarrow as pa

from mtcls import Tokens
from mtcls.inference import POOLED

log = logging.getLogger(__name__)

FEATURES = "features"
LENGTH = "length"


def tokens_of(column: Any) -> Tokens:
    """An Arrow ``list<int32>`` column of token ids -> :class:`Tokens` (no per-row Python objects)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy().astype(np.int64)
    ids = arr.values.to_numpy()[offsets[0]:offsets[-1]].astype(np.int32, copy=False)
    return Tokens(ids, offsets - offsets[0], np.zeros(len(arr), bool))


class FeatureStage:
    """Ray Data actor: a block with ``input_ids`` -> the same block with ``length`` and ``features``
    ((N, hidden) float32, a tensor column) instead of ``input_ids``.

    Args:
        files_ref: ``[ray.put(read_model_files(dir))]`` of the starting model.
        precision: Training's ``precision`` key for training features, or ``"fp32"``.
        torch_threads: CPU threads of the actor.
    """

    def __init__(self, files_ref: list, precision: str, torch_threads: int) -> None:
        import torch

        from pipelines.inference import load_shipped_engine
        from pipelines.train.precision import training_autocast

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype, _ = training_autocast(precision, device)
        name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        self.engine, self._files = load_shipped_engine(files_ref, torch_threads=torch_threads, precision=name, device=device)

    def __call__(self, block: pa.Table) -> pa.Table:
        from ray.data.extensions import ArrowTensorArray

        tokens = tokens_of(block.column("input_ids"))
        pooled = self.engine.predict_tokens(tokens, with_pooled=True)[POOLED]  # (N, H) float32, in block order
        out = block.drop_columns(["input_ids"])
        out = out.append_column(LENGTH, pa.array(tokens.lengths.astype(np.int32)))
        return out.append_column(FEATURES, ArrowTensorArray.from_numpy(pooled))


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
            FeatureStage,
            fn_constructor_kwargs=dict(files_ref=files_ref, precision=precision if split == "train" else "fp32", torch_threads=threads),
            batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors), num_cpus=cpus, num_gpus=gpus,
        ).materialize()
    cost = {"seconds": time.perf_counter() - start, "rows": sum(ds.count() for ds in out.values()),
            "bytes": sum(ds.size_bytes() for ds in out.values())}
    log.info("cached features of %d rows in %.1f s (%.1f MB in the object store)", cost["rows"], cost["seconds"], cost["bytes"] / 1e6)
    return out, cost
