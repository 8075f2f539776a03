"""The whole flow on the embedded default, on a local Ray, with nothing downloaded:

    python -m jobs.demo

1. generate a labelled multi-task corpus (product reviews; heads: spam (binary), sentiment
   (multiclass), aspects (multilabel), aspect_sentiment (grouped: 4 aspects x 3 classes));
2. fine-tune all-MiniLM-L6-v2 on its train split with the training pipeline (Ray Train);
3. score its test split with the scoring pipeline (Ray Data);
4. evaluate the scored table against the test labels with the evaluation pipeline (joined on id);
5. print where the model, predictions and report are, scoring rows/s and per-head macro-F1.

Keys: ``python -m jobs.demo --help`` (from ``pipelines.demo.config.DemoConfig``).
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from pipelines.config import load_config
from pipelines.demo.run import DemoConfig, run_demo
from pipelines.runtime import parse_job_args, run_job, setup_logging


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config_path, overrides = parse_job_args(argv, "Train, score and evaluate on the embedded demo corpus", DemoConfig)
    cfg = load_config(DemoConfig, config_path, overrides)
    setup_logging(cfg.verbose)
    summary = run_demo(cfg)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    run_job(main)
