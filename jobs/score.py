"""Batch scoring: Parquet in, every head's predictions out.

    python -m jobs.score                                   # embedded demo corpus and default model
    python -m jobs.score --config jobs/configs/score/goemotions.yaml model=/path/to/model
    ray job submit --working-dir . -- python -m jobs.score input=s3://bucket/corpus/ output=s3://bucket/scores/ model=s3://bucket/model/

Keys: see ``pipelines.scoring.ScoreConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Optional, Sequence

from pipelines.config import load_config
from pipelines.runtime import init_ray, parse_job_args, run_job, setup_logging
from pipelines.sample import default_corpus_dir, default_model_dir
from pipelines.scoring import ScoreConfig, localize_model, run_scoring


log = logging.getLogger("jobs.score")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    # 1. Config: validated before anything starts.
    config_path, overrides = parse_job_args(argv, "Score Parquet text with a multi-head classifier")
    cfg = load_config(ScoreConfig, config_path, overrides)
    setup_logging()

    # 2. Resolve the embedded defaults and the model.
    if not cfg.input:
        cfg = dataclasses.replace(cfg, input=str(default_corpus_dir() / "test.parquet"))
        log.info("no input given: scoring the embedded demo corpus %s", cfg.input)
    model_uri = cfg.model or str(default_model_dir())
    model_dir = localize_model(model_uri)

    # 3. Run.
    init_ray()
    manifest = run_scoring(cfg, model_dir, model_uri)

    # 4. Summary.
    rate = manifest.get("rows_per_s_this_run")
    print(
        json.dumps(
            {
                "output": cfg.output,
                "rows_in": manifest["rows_in"],
                "rows_out": manifest["rows_out"],
                "rows_error": manifest["rows_error"],
                "rows_truncated": manifest["rows_truncated"],
                "rows_scored_this_run": manifest["rows_scored_this_run"],
                "rows_per_s": round(rate, 1) if rate else None,
                "manifest": f"{cfg.output.rstrip('/')}/_manifest.json",
            },
            indent=2,
        )
    )
    return manifest


if __name__ == "__main__":
    run_job(main)
