"""Fine-tuning on Ray Train; the output directory is a model jobs.score loads as is.

    python -m jobs.train                                      # the embedded demo corpus, default heads
    python -m jobs.train --config jobs/configs/train/olid.yaml
    ray job submit --working-dir . -- python -m jobs.train --config jobs/configs/train/olid.yaml num_workers=4 use_gpu=true

Keys: see ``pipelines.train_data.TrainConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Optional, Sequence

from pipelines.config import load_config
from pipelines.runtime import init_ray, parse_job_args, run_job, setup_logging
from pipelines.sample import DEFAULT_HEADS, default_corpus_dir

from pipelines.train_data import TrainConfig
from pipelines.training import run_training

log = logging.getLogger("jobs.train")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    # 1. Config, validated before anything starts.
    config_path, overrides = parse_job_args(argv, "Fine-tune a multi-head classifier on Ray Train")
    cfg = load_config(TrainConfig, config_path, overrides)
    setup_logging()
    if not cfg.train:
        corpus = default_corpus_dir()
        cfg = dataclasses.replace(cfg, train=[str(corpus / "train.parquet")], heads=cfg.heads or DEFAULT_HEADS)
        log.info("no training data given: the embedded demo corpus %s", corpus)

    # 2. Train.
    init_ray()
    summary = run_training(cfg)

    # 3. Summary.
    print(json.dumps({
        "model": cfg.output,
        "best_epoch": summary["best_epoch"],
        cfg.best_metric: round(summary["best_score"], 4),
        "macro_f1": {k[: -len("_macro_f1")]: round(v, 4) for k, v in summary["best_metrics"].items() if k.endswith("_macro_f1") and k != "mean_macro_f1"},
        "rows": summary["rows"],
        "skipped_rows_without_text": summary["skipped_rows_without_text"],
        "seconds": round(summary["seconds"], 1),
    }, indent=2))
    return summary


if __name__ == "__main__":
    run_job(main)
