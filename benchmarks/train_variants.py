"""GoEmotions: positive-weighting variants and length grouping on a short budget, printed as JSON.

    python benchmarks/train_variants.py

Runs ``jobs.train`` with ``jobs/configs/train/goemotions.yaml`` (one epoch, best epoch by
``emotions_tuned_macro_f1``), each in its own process, as recorded in benchmarks/RESULTS.md:
- ``pos_weight`` balanced / sqrt_balanced / none on every head, first 8,000 training rows;
- ``length_grouping`` 1 (off) and 50 (default) with sqrt_balanced, first 3,000 training rows.
Prints each run's validation (dev) metrics and training examples/s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / "../shared/data/goemotions/dev.parquet"


def heads(pos_weight: str) -> str:
    extra = f", pos_weight: {pos_weight}" if pos_weight != "none" else ""
    return "[" + ", ".join(f"{{name: {n}, kind: multilabel{extra}}}" for n in ("emotions", "ekman", "sentiment")) + "]"


def train(work: Path, name: str, *overrides: str) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "jobs.train", "--config", "jobs/configs/train/goemotions.yaml", "epochs=1",
           "best_metric=emotions_tuned_macro_f1", f"output={out}", f"storage_path={work / 'ray_train'}", *overrides]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "training_summary.json").read_text())
    return {k: v for k, v in summary["best_metrics"].items() if "f1" in k or k == "train_examples_per_s"}


def main() -> None:
    if not DEV.is_file():
        print(json.dumps({"skipped": f"{DEV} not found (needs ../shared/data)"}))
        return
    work = Path(tempfile.mkdtemp(prefix="mtcls-variants-"))
    weighting = {pw: train(work, pw, f"heads={heads(pw)}", "max_train_rows=8000") for pw in ("sqrt_balanced", "balanced", "none")}
    grouping = {g: train(work, f"group{g}", f"heads={heads('sqrt_balanced')}", "max_train_rows=3000", f"length_grouping={g}")
                for g in (1, 50)}
    print(json.dumps({
        "machine": {"cpus": os.cpu_count()},
        "pos_weight_8000_rows": weighting,
        "length_grouping_3000_rows": grouping,
        "grouping_speedup": grouping[50]["train_examples_per_s"] / grouping[1]["train_examples_per_s"],
    }, indent=2))


if __name__ == "__main__":
    main()
