"""Drift over a series of scoring partitions: one table, one plot per head.

    python -m jobs.drift root=s3://bucket/scores/            # reads scores/date=*/_manifest.json
    python -m jobs.drift root=outputs/scores output=outputs/drift format=parquet

Keys: ``python -m jobs.drift --help`` (from ``pipelines.drift.DriftConfig``).
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from pipelines.config import load_config
from pipelines.drift import DriftConfig, run_drift
from pipelines.runtime import parse_job_args, run_job, setup_logging


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and "=" not in args[0] and not args[0].startswith("-"):
        args[0] = f"root={args[0]}"  # python -m jobs.drift <scores root>
    config_path, overrides = parse_job_args(args, "Prediction mix and drift over scoring partitions", DriftConfig)
    cfg = load_config(DriftConfig, config_path, overrides)
    setup_logging(cfg.verbose)
    summary = run_drift(cfg)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    run_job(main)
