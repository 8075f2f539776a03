"""Fine-tuning on Ray Train: labelled Parquet in, a saved multi-head model out.

    python -m jobs.train                                    # the embedded demo corpus and heads
    python -m jobs.train --config jobs/configs/train/olid.yaml
    ray job submit --working-dir . -- python -m jobs.train --config jobs/configs/train/olid.yaml num_workers=2 use_gpu=true

Keys: ``python -m jobs.train --help`` (from ``pipelines.train.TrainConfig``).
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from pipelines.config import load_config
from pipelines.demo.defaults import with_demo_training_data
from pipelines.runtime import parse_job_args, run_job, setup_logging
from pipelines.train import TrainConfig, run_train


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config_path, overrides = parse_job_args(argv, "Fine-tune a multi-head classifier on Ray Train", TrainConfig)
    cfg = load_config(TrainConfig, config_path, overrides)
    setup_logging(cfg.verbose)
    summary = run_train(with_demo_training_data(cfg))
    print(json.dumps({
        "model": cfg.output,
        "best_epoch": summary["best_epoch"],
        cfg.best_metric: round(summary["best_score"], 4),
        "macro_f1": {k[: -len("_macro_f1")]: round(v, 4) for k, v in summary["best_metrics"].items()
                     if k.endswith("_macro_f1") and k != "mean_macro_f1"},
        "rows": summary["rows"],
        "skipped_rows_without_text": summary["skipped_rows_without_text"],
        "seconds": round(summary["seconds"], 1),
    }, indent=2))
    return summary


if __name__ == "__main__":
    run_job(main)
