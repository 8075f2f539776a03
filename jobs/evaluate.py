"""Evaluation: per-head reports, aggregated exactly across shards.

    python -m jobs.evaluate                                  # the embedded demo corpus and default model
    python -m jobs.evaluate data=../shared/data/olid/test.parquet model=MODEL text_columns=[tweet] output=outputs/eval-olid
    python -m jobs.evaluate predictions=outputs/score labels=labels.parquet slice_by=[source] output=outputs/eval

Keys: ``python -m jobs.evaluate --help`` (from ``pipelines.evaluate.EvalConfig``). Writes report.json,
report.md and one ``<head>_confusion.png`` per head to ``output``.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from pipelines.config import load_config
from pipelines.demo.defaults import with_embedded_defaults
from pipelines.evaluate import EvalConfig, run_evaluate
from pipelines.runtime import parse_job_args, run_job, setup_logging


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config_path, overrides = parse_job_args(argv, "Evaluate a multi-head classifier per head", EvalConfig)
    cfg = load_config(EvalConfig, config_path, overrides)
    setup_logging(cfg.verbose)
    if not cfg.predictions:
        cfg = with_embedded_defaults(cfg, "data")
    report = run_evaluate(cfg)
    print(json.dumps({
        "report": cfg.output,
        "rows": report["rows"],
        "rows_unscored": report["rows_unscored"],
        "macro_f1": {h: round(r["macro_f1"], 4) for h, r in report["heads"].items()},
        **({"join": report["join"]} if "join" in report else {}),
    }, indent=2))
    return report


if __name__ == "__main__":
    run_job(main)
