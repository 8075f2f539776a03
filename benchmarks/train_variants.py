"""GoEmotions: positive-weighting variants and length grouping on a short budget, printed as JSON.

    python -m benchmarks.train_variants

Runs ``jobs.train`` with ``jobs/configs/train/goemotions.yaml`` (one epoch, best epoch by
``emotions_tuned_macro_f1``), each in its own process, as recorded in benchmarks/RESULTS.md:
- ``pos_weight`` balanced / sqrt_balanced / none on every head, first 8,000 training rows;
- ``length_grouping`` 1 (off) and 50 (default) with sqrt_balanced, first 3,000 training rows.
Prints each run's validation (dev) metrics and training examples/s.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.harness import GOEMOTIONS, machine, parser, print_json, skip, train_job

DEV = GOEMOTIONS / "dev.parquet"


def heads(pos_weight: str) -> str:
    """The three GoEmotions multilabel heads as a ``heads=`` value, with ``pos_weight`` (or none)."""
    extra = f", pos_weight: {pos_weight}" if pos_weight != "none" else ""
    return "[" + ", ".join(f"{{name: {n}, kind: multilabel{extra}}}" for n in ("emotions", "ekman", "sentiment")) + "]"


def train(work: Path, name: str, *overrides: str) -> dict:
    """One epoch of the GoEmotions config in its own process; the best epoch's F1 metrics and examples/s."""
    summary = train_job(work / name, ["epochs=1", "best_metric=emotions_tuned_macro_f1", *overrides], work / "ray_train",
                        config="jobs/configs/train/goemotions.yaml")
    return {k: v for k, v in summary["best_metrics"].items() if "f1" in k or k == "train_examples_per_s"}


def main() -> None:
    parser(__doc__).parse_args()
    if not DEV.is_file():
        skip(f"{DEV} not found (needs ../shared/data)")
        return
    work = Path(tempfile.mkdtemp(prefix="mtcls-variants-"))
    weighting = {pw: train(work, pw, f"heads={heads(pw)}", "max_train_rows=8000") for pw in ("sqrt_balanced", "balanced", "none")}
    grouping = {g: train(work, f"group{g}", f"heads={heads('sqrt_balanced')}", "max_train_rows=3000", f"length_grouping={g}")
                for g in (1, 50)}
    print_json({
        "machine": machine("cpus"),
        "pos_weight_8000_rows": weighting,
        "length_grouping_3000_rows": grouping,
        "grouping_speedup": grouping[50]["train_examples_per_s"] / grouping[1]["train_examples_per_s"],
    })


if __name__ == "__main__":
    main()
