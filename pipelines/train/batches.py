"""The order of training batches: length-grouped windows, accumulation groups, per-epoch seeds.

Every choice here is seeded by the job's seed and the epoch, so a worker group restarted from a
checkpoint cuts the same batches, in the same order, with the same random state, as an
uninterrupted run.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np

from pipelines.train.features import LENGTH


def length_grouped(batches: Any, batch_size: int, seed: int) -> Any:
    """Re-cuts large batches into ``batch_size`` batches of similar length, in shuffled order.

    Each incoming batch (a window of many training batches) is sorted by token count and cut into
    batches; their order is then shuffled. Batches pad to their longest row, so this removes most
    padding (short texts such as GoEmotions' comments) while every row is still seen once per epoch.
    Rows of cached features carry their token count in ``length``, so they are cut into the same
    batches as their token ids would be.

    Args:
        batches: Numpy batches (dicts of columns) with ``input_ids`` or ``length``.
        batch_size: Rows per batch cut.
        seed: Seed of the shuffle.

    Yields:
        Batches of at most ``batch_size`` rows.
    """
    rng = np.random.default_rng(seed)
    for window in batches:
        lengths = window[LENGTH] if LENGTH in window else [len(x) for x in window["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for k in rng.permutation(len(chunks)):
            yield {key: value[chunks[k]] for key, value in window.items()}


def in_groups(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last one may be shorter)."""
    group: list[Any] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one worker's epoch (dropout), so a resumed epoch repeats exactly."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
