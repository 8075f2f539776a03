"""Driver memory of training-data preparation, printed as JSON.

    python -m benchmarks.prepare_memory [--multipliers 2 8]

Writes the GoEmotions training split cycled to 2x and 8x its rows (row groups of 50,000 rows), and
runs ``pipelines.train.data.prepare_data`` on each in a fresh process, twice: as the training job
does (every piece goes to the Ray object store), and holding every piece in the driver (the
baseline: what the job did before pieces went to the object store). It reports the peak growth of
the driver's private memory (``RssAnon``, sampled every 20 ms; pages of Ray's shared-memory object
store are not private to the driver) over its level before preparation.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from benchmarks.harness import GOEMOTIONS, RssAnonSampler, Timer, machine, parser, print_json, run_module, skip

TRAIN = GOEMOTIONS / "train.parquet"
HEADS = [{"name": n, "kind": "multilabel", "pos_weight": "balanced"} for n in ("emotions", "ekman", "sentiment")]


def child(path: str, mode: str, result: str) -> None:
    """Prepares ``path`` in this process and writes its figures to ``result`` (JSON).

    Args:
        path: The training file.
        mode: ``object_store`` (pieces go to Ray's object store, as the training job does) or
            ``driver_memory`` (every piece held by this process).
        result: Where the figures go.
    """
    import ray
    from transformers import AutoTokenizer

    import mtcls
    from pipelines.config import load_config
    from pipelines.train.config import TrainConfig
    from pipelines.train.data import prepare_data

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=1)
    tok = AutoTokenizer.from_pretrained(str(mtcls.default_encoder_path()))
    cfg = load_config(TrainConfig, None, [f"train=[{path}]", f"heads={json.dumps(HEADS)}", "max_length=64"])
    with RssAnonSampler() as memory, Timer() as timer:
        data = prepare_data(cfg, tok, f" {tok.sep_token} ", put=ray.put if mode == "object_store" else (lambda t: t))
    held = sum(t.nbytes for t in data.train.parts + data.validation.parts) if mode == "driver_memory" else 0
    figures = {"mode": mode, "rows": data.train.rows + data.validation.rows, "pieces": len(data.train.parts),
               "prepared_arrow_mb_held_by_driver": held / 2**20, "seconds": timer.seconds,
               "driver_peak_growth_mb": memory.growth_mb}
    Path(result).write_text(json.dumps(figures))
    ray.shutdown()


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--multipliers", type=int, nargs="+", default=[2, 8])
    cli.add_argument("--child", nargs=3, metavar=("PATH", "MODE", "RESULT"), help=argparse.SUPPRESS)
    args = cli.parse_args()
    if args.child:
        child(*args.child)
        return
    if not TRAIN.is_file():
        skip(f"{TRAIN} not found (needs ../shared/data)")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = pq.read_table(TRAIN, columns=["text", "emotions", "ekman", "sentiment"])
    work = Path(tempfile.mkdtemp(prefix="mtcls-prepare-"))
    runs = []
    for m in args.multipliers:
        path = work / f"train_x{m}.parquet"
        pq.write_table(pa.concat_tables([base] * m), path, row_group_size=50_000)
        for mode in ("object_store", "driver_memory"):
            result = work / f"x{m}_{mode}.json"
            figures = run_module("benchmarks.prepare_memory", ["--child", str(path), mode, str(result)], result, f"x{m} {mode}")
            runs.append({"multiplier": m, **figures})
    growth = {(r["multiplier"], r["mode"]): r["driver_peak_growth_mb"] for r in runs}
    lo, hi = min(args.multipliers), max(args.multipliers)
    print_json({
        "machine": machine("cpus"),
        "runs": runs,
        f"object_store_growth_ratio_x{hi}_over_x{lo}": growth[(hi, "object_store")] / growth[(lo, "object_store")],
        f"driver_memory_growth_ratio_x{hi}_over_x{lo}": growth[(hi, "driver_memory")] / growth[(lo, "driver_memory")],
    })


if __name__ == "__main__":
    main()
