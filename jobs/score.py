"""Batch scoring: Parquet in, every head's predictions out.

    python -m jobs.score                                   # embedded demo corpus and default model
    python -m jobs.score --config jobs/configs/score/goemotions.yaml model=/path/to/model
    ray job submit --working-dir . -- python -m jobs.score input=s3://bucket/corpus/ output=s3://bucket/scores/ model=s3://bucket/model/
    python -m jobs.score ... fail_on_drift=true          # exit status 3 (after _SUCCESS) when a head drifted
    python -m jobs.score ... plan=true                   # dry run: inputs, pending rows, resources, estimated time

Keys: ``python -m jobs.score --help`` (from ``pipelines.score.ScoreConfig``).
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from pipelines.config import load_config
from pipelines.demo.defaults import with_embedded_defaults
from pipelines.runtime import parse_job_args, run_job, setup_logging
from pipelines.score import ScoreConfig, run_score
from pipelines.score.drift import raise_on_drift
from pipelines.sink import manifest_path


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config_path, overrides = parse_job_args(argv, "Score Parquet text with a multi-head classifier", ScoreConfig)
    cfg = load_config(ScoreConfig, config_path, overrides)
    setup_logging(cfg.verbose)
    cfg = with_embedded_defaults(cfg, None if cfg.input_table else "input")
    manifest = run_score(cfg)
    if cfg.plan:  # a dry run: the plan, nothing written
        print(json.dumps(manifest, indent=2))
        return manifest
    rate = manifest.get("rows_per_s_this_run")
    keys = ("rows_in", "rows_out", "rows_error", "rows_truncated", "rows_scored_this_run")
    print(json.dumps({"output": cfg.output, **{k: manifest[k] for k in keys},
                      "rows_per_s": round(rate, 1) if rate else None,
                      "drift_flagged": manifest.get("drift", {}).get("flagged"),
                      "manifest": manifest_path(cfg)}, indent=2))
    if cfg.fail_on_drift:
        raise_on_drift(manifest["drift"], cfg.output)  # after _SUCCESS: exit status 3
    return manifest


if __name__ == "__main__":
    run_job(main)
