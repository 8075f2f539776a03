"""Evaluation: per-head reports, aggregated exactly across shards.

    python -m jobs.evaluate                                  # the embedded demo corpus and default model
    python -m jobs.evaluate data=../shared/data/olid/test.parquet model=MODEL text_columns=[tweet] output=outputs/eval-olid
    python -m jobs.evaluate predictions=outputs/score labels=labels.parquet slice_by=[source] output=outputs/eval

Keys: see ``pipelines.evaluation.EvalConfig``. Writes report.json, report.md and one
``<head>_confusion.png`` per head to ``output``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from mtcls import MultiTaskConfig
from pipelines.config import ConfigError, config_to_dict, load_config
from pipelines.evaluation import EvalConfig, build_report, evaluate_data, evaluate_predictions, specs_from_predictions
from pipelines.report import plot_confusion, report_markdown
from pipelines.runtime import init_ray, parse_job_args, run_job, setup_logging
from pipelines.sample import default_corpus_dir, default_model_dir
from pipelines.scoring import ScoreConfig, localize_model, model_identity, plan_resources, read_model_files
from pipelines.storage import locate, write_json

log = logging.getLogger("jobs.evaluate")


def save_tuned_model(model_dir: Path, target: str, tuning: dict) -> None:
    """Writes a copy of the model whose binary/multilabel thresholds are the tuned ones."""
    from transformers import AutoTokenizer

    from mtcls import HeadSpec, MultiTaskModel

    model = MultiTaskModel.from_pretrained(model_dir)
    for head, result in tuning.items():
        spec = model.specs[head]
        value = result["thresholds"][0] if spec.kind == "binary" else result["thresholds"]
        model.set_head_spec(HeadSpec.from_dict({**spec.to_dict(), "thresholds": value}))
    loc = locate(target)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        loc.fs.makedirs(loc.path, exist_ok=True)
        for f in Path(tmp).iterdir():
            loc.fs.put(str(f), posixpath.join(loc.path, f.name))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    # 1. Config, validated before anything starts.
    config_path, overrides = parse_job_args(argv, "Evaluate a multi-head classifier per head")
    cfg = load_config(EvalConfig, config_path, overrides)
    setup_logging()

    # 2. Sources: labelled data + model, or predictions + labels.
    model_dir = None
    if cfg.predictions:
        specs, identity = specs_from_predictions(cfg.predictions)
    else:
        if not cfg.data:
            cfg = dataclasses.replace(cfg, data=str(default_corpus_dir() / "test.parquet"))
            log.info("no data given: evaluating on the embedded demo corpus %s", cfg.data)
        model_uri = cfg.model or str(default_model_dir())
        model_dir = localize_model(model_uri)
        specs = MultiTaskConfig.from_pretrained(model_dir).head_specs()
        identity = model_identity(model_dir, model_uri)

    # 3. Per-block statistics on Ray, merged into dataset-wide totals.
    init_ray()
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = cfg.progress
    if cfg.predictions:
        totals, details = evaluate_predictions(cfg, specs)
    else:
        plan = plan_resources(ScoreConfig(), ray.cluster_resources())
        max_length = cfg.max_length or MultiTaskConfig.from_pretrained(model_dir).max_seq_length
        totals, details = evaluate_data(cfg, specs, [ray.put(read_model_files(model_dir))], max_length, plan.torch_threads, plan.num_actors)

    # 4. Report: JSON, markdown, PNGs, optional tuned model.
    report = build_report(specs, totals, details["label_columns"], cfg.tune_thresholds)
    report["model"] = identity
    report["config"] = config_to_dict(cfg)
    if "join" in details:
        report["join"] = details["join"]
    out = locate(cfg.output)
    out.fs.makedirs(out.path, exist_ok=True)
    write_json(out.join("report.json"), report)
    with out.fs.open(out.join("report.md").path, "w") as fh:
        fh.write(report_markdown(report))
    if cfg.plots:
        with tempfile.TemporaryDirectory() as tmp:
            for head, rep in report["heads"].items():
                local = str(Path(tmp) / f"{head}_confusion.png")
                plot_confusion(head, rep, local)
                out.fs.put(local, out.join(f"{head}_confusion.png").path)
    if cfg.save_tuned_model:
        if model_dir is None:
            raise ConfigError("key 'save_tuned_model': needs a model (evaluate with data + model)")
        save_tuned_model(model_dir, cfg.save_tuned_model, report.get("threshold_tuning", {}))

    # 5. Summary.
    summary = {
        "report": cfg.output,
        "rows": report["rows"],
        "rows_unscored": report["rows_unscored"],
        "macro_f1": {h: round(r["macro_f1"], 4) for h, r in report["heads"].items()},
        **({"join": report["join"]} if "join" in report else {}),
    }
    print(json.dumps(summary, indent=2))
    return report


if __name__ == "__main__":
    run_job(main)
