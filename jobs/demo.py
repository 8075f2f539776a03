"""The whole flow on the embedded default, on a local Ray, with nothing downloaded:

    python -m jobs.demo

1. generate a labelled multi-task corpus (product reviews; heads: spam (binary), sentiment
   (multiclass), aspects (multilabel), aspect_sentiment (grouped: 4 aspects x 3 classes));
2. fine-tune all-MiniLM-L6-v2 on its train split with the training job (Ray Train);
3. score its test split with the scoring job (Ray Data);
4. evaluate the scored table against the test labels with the evaluation job (joined on id);
5. print where the model, predictions and report are, scoring rows/s and per-head macro-F1.

Keys (``key=value``): ``output`` (default ``outputs/demo``), ``rows`` (corpus rows per split),
``epochs``, ``progress``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from jobs import evaluate as evaluate_job
from pipelines.config import ConfigError, load_config
from pipelines.runtime import init_ray, parse_job_args, run_job, setup_logging
from pipelines.sample import default_corpus_dir, default_train_config
from pipelines.scoring import ScoreConfig, localize_model, run_scoring

from pipelines.training import run_training

log = logging.getLogger("jobs.demo")


@dataclass
class DemoConfig:
    """Config of ``jobs.demo``."""

    output: str = "outputs/demo"
    rows: int = 2000
    epochs: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        if self.rows < 100:
            raise ConfigError(f"key 'rows': at least 100 rows, got {self.rows}")
        if self.epochs < 1:
            raise ConfigError(f"key 'epochs': must be >= 1, got {self.epochs}")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    config_path, overrides = parse_job_args(argv, "Train, score and evaluate on the embedded demo corpus")
    cfg = load_config(DemoConfig, config_path, overrides)
    setup_logging()
    started = time.time()
    out = Path(cfg.output).resolve()
    init_ray()

    # 1-2. Corpus and fine-tuning.
    corpus = default_corpus_dir(cfg.rows)
    train = run_training(default_train_config(str(out / "model"), rows=cfg.rows, epochs=cfg.epochs,
                                              storage_path=str(out / "ray_train")))

    # 3. Scoring.
    score_cfg = ScoreConfig(input=str(corpus / "test.parquet"), output=str(out / "predictions"), model=str(out / "model"),
                            overwrite=True, progress=cfg.progress)
    manifest = run_scoring(score_cfg, localize_model(score_cfg.model), score_cfg.model)

    # 4. Evaluation of the scored table against the labels.
    report = evaluate_job.main([f"predictions={out / 'predictions'}", f"labels={corpus / 'test.parquet'}",
                                f"output={out / 'report'}", f"progress={str(cfg.progress).lower()}"])

    # 5. Summary.
    summary = {
        "model": str(out / "model"),
        "predictions": str(out / "predictions"),
        "report": str(out / "report" / "report.md"),
        "rows_scored": manifest["rows_out"],
        "scoring_rows_per_s": round(manifest["rows_per_s_this_run"] or 0.0, 1),
        "test_macro_f1": {h: round(r["macro_f1"], 4) for h, r in report["heads"].items()},
        "training_best_epoch": train["best_epoch"],
        "minutes": round((time.time() - started) / 60, 2),
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    run_job(main)
