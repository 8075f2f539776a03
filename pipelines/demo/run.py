"""The whole flow on the embedded default: train -> score -> evaluate, on a local Ray, nothing downloaded."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipelines.demo.config import DemoConfig
from pipelines.demo.corpus import default_corpus_dir
from pipelines.demo.default_model import default_train_config
from pipelines.evaluate import EvalConfig, run_evaluate
from pipelines.score import ScoreConfig, run_score
from pipelines.train import run_train


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Generates the corpus, fine-tunes MiniLM on it, scores the test split and evaluates the scores.

    Returns:
        A summary: where the model, predictions and report are, scoring rows/s, per-head test macro-F1.
    """
    started = time.time()
    out = Path(cfg.output).resolve()
    corpus = default_corpus_dir(cfg.rows)
    train = run_train(default_train_config(str(out / "model"), rows=cfg.rows, epochs=cfg.epochs,
                                           storage_path=str(out / "ray_train"), verbose=cfg.verbose))
    manifest = run_score(ScoreConfig(input=str(corpus / "test.parquet"), output=str(out / "predictions"),
                                     model=str(out / "model"), overwrite=True, progress=cfg.progress,
                                     verbose=cfg.verbose))
    report = run_evaluate(EvalConfig(predictions=str(out / "predictions"), labels=str(corpus / "test.parquet"),
                                     output=str(out / "report"), progress=cfg.progress, verbose=cfg.verbose))
    return {
        "model": str(out / "model"),
        "predictions": str(out / "predictions"),
        "report": str(out / "report" / "report.md"),
        "rows_scored": manifest["rows_out"],
        "scoring_rows_per_s": round(manifest["rows_per_s_this_run"] or 0.0, 1),
        "test_macro_f1": {h: round(r["macro_f1"], 4) for h, r in report["heads"].items()},
        "training_best_epoch": train["best_epoch"],
        "minutes": round((time.time() - started) / 60, 2),
    }
