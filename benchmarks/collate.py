"""Training's collate step: padding a micro-batch of token id rows into (B, T) ids and mask.

    python -m benchmarks.collate

Times ``Tokens.from_rows(rows).padded(...)`` (what ``pipelines.train.step.micro_batch`` does)
against the separate list-of-rows padder it replaced (kept here as the baseline), on GoEmotions-
length rows (5-60 tokens) in micro-batches of 32, in alternating rounds; prints JSON with the ratio.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from benchmarks.harness import machine, parser, print_json
from mtcls.inference import Tokens


def baseline_pad(rows, pad_id: int):
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max())
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.arange(width)[None, :] < lengths[:, None]
    ids[mask] = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def tokens_pad(rows, pad_id: int):
    return Tokens.from_rows(rows).padded(np.arange(len(rows)), pad_id)


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--batches", type=int, default=2000)
    cli.add_argument("--rounds", type=int, default=5)
    args = cli.parse_args()
    rng = np.random.default_rng(0)
    batches = [[rng.integers(1, 30000, rng.integers(5, 61)).astype(np.int32) for _ in range(32)] for _ in range(args.batches)]
    for a, b in zip(baseline_pad(batches[0], 0), tokens_pad(batches[0], 0)):
        assert torch.equal(a, b)
    times = {"baseline": [], "tokens": []}
    for _ in range(args.rounds):
        for name, fn in (("baseline", baseline_pad), ("tokens", tokens_pad)):
            start = time.perf_counter()
            for rows in batches:
                fn(rows, 0)
            times[name].append((time.perf_counter() - start) / len(batches) * 1e6)
    median = {k: statistics.median(v) for k, v in times.items()}
    print_json({"machine": machine(), "us_per_batch": median, "tokens_over_baseline_time": median["tokens"] / median["baseline"]})


if __name__ == "__main__":
    main()
