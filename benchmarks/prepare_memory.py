"""Driver memory of training-data preparation, printed as JSON.

    python benchmarks/prepare_memory.py [--multipliers 2 8]

Writes the GoEmotions training split cycled to 2x and 8x its rows (row groups of 50,000 rows), and
runs ``pipelines.train_data.prepare_data`` on each in a fresh process, twice: as the training job
does (every piece goes to the Ray object store), and holding every piece in the driver (the
baseline: what the job did before pieces went to the object store). It reports the peak growth of
the driver's private memory (``RssAnon``, sampled every 20 ms; pages of Ray's shared-memory object
store are not private to the driver) over its level before preparation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRAIN = ROOT / "../shared/data/goemotions/train.parquet"
HEADS = [{"name": n, "kind": "multilabel", "pos_weight": "balanced"} for n in ("emotions", "ekman", "sentiment")]


def rss_anon_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(path: str, mode: str) -> None:
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
    peak = [rss_anon_mb()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon_mb())
            time.sleep(0.02)

    before = rss_anon_mb()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    data = prepare_data(cfg, tok, f" {tok.sep_token} ", put=ray.put if mode == "object_store" else (lambda t: t))
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    peak[0] = max(peak[0], rss_anon_mb())
    held = sum(t.nbytes for t in data.train.parts + data.validation.parts) if mode == "driver_memory" else 0
    print(json.dumps({"mode": mode, "rows": data.train.rows + data.validation.rows, "pieces": len(data.train.parts),
                      "prepared_arrow_mb_held_by_driver": held / 2**20,
                      "seconds": seconds, "driver_peak_growth_mb": peak[0] - before}))
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--multipliers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--child", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if not TRAIN.is_file():
        print(json.dumps({"skipped": f"{TRAIN} not found (needs ../shared/data)"}))
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
            out = subprocess.run([sys.executable, __file__, "--child", str(path), mode], capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            runs.append({"multiplier": m, **json.loads(out.stdout.strip().splitlines()[-1])})
    growth = {(r["multiplier"], r["mode"]): r["driver_peak_growth_mb"] for r in runs}
    lo, hi = min(args.multipliers), max(args.multipliers)
    print(json.dumps({
        "machine": {"cpus": os.cpu_count()},
        "runs": runs,
        f"object_store_growth_ratio_x{hi}_over_x{lo}": growth[(hi, "object_store")] / growth[(lo, "object_store")],
        f"driver_memory_growth_ratio_x{hi}_over_x{lo}": growth[(hi, "driver_memory")] / growth[(lo, "driver_memory")],
    }, indent=2))


if __name__ == "__main__":
    main()
