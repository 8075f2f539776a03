"""Fine-tuning on Ray Train: prepare data on the driver, run the DDP loop, export the best epoch.

The output directory is what ``jobs.score`` loads as is: ``config.json`` + ``model.safetensors`` +
the tokenizer, plus ``training_summary.json`` (per-epoch metrics and per-head reports) and one
``<head>_training.png`` (loss and macro-F1 per epoch) per head, and ``reference_profile.json``:
the exported model's prediction profile of the validation set (:mod:`pipelines.train.reference`),
the reference that scoring measures drift against.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mtcls import HeadSpec, MultiTaskModel, default_encoder_path, text_separator
from mtcls.profile import REFERENCE_FILE, reference_document
from pipelines.artifacts import localize_model, read_model_files
from pipelines.demo.corpus import DEFAULT_HEADS, default_corpus_dir
from pipelines.runtime import init_ray
from pipelines.storage import locate, write_json
from pipelines.train.plots import plot_history
from pipelines.train.config import TrainConfig
from pipelines.train.data import prepare_data
from pipelines.train.features import cache_features
from pipelines.train.loop import STATE_FILE, train_loop_per_worker

log = logging.getLogger(__name__)


def build_initial_model(cfg: TrainConfig, specs: list, target: Path, tokenizer: Any) -> None:
    """Saves the starting model (pretrained encoder + new heads, or ``init_model`` + added heads)."""
    torch.manual_seed(cfg.seed)
    if cfg.init_model:
        model = MultiTaskModel.from_pretrained(localize_model(cfg.init_model))
        for spec in specs:
            if spec.name not in model.specs:
                model.add_head(spec)
    else:
        encoder = cfg.encoder or str(default_encoder_path())
        model = MultiTaskModel.from_encoder(localize_model(encoder) if "://" in encoder else encoder, specs,
                                            pooling=cfg.pooling, max_seq_length=cfg.max_length)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Trains and exports the best model; starts a local Ray if none is running.

    Empty ``train`` trains on the embedded demo corpus (with the demo heads if none are given).

    Returns:
        The training summary (also written to ``<output>/training_summary.json``).
    """
    if not cfg.train:
        corpus = default_corpus_dir()
        cfg = dataclasses.replace(cfg, train=[str(corpus / "train.parquet")], heads=cfg.heads or DEFAULT_HEADS)
        log.info("no training data given: the embedded demo corpus %s", corpus)
    init_ray()
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="mtcls-train-"))
    try:
        return _train(cfg, work, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def optimizer_steps(optimizer_state: dict[str, Any]) -> int:
    """Optimizer updates made so far, from an AdamW ``state_dict()`` (0 before the first)."""
    return max((int(s["step"]) for s in optimizer_state["state"].values()), default=0)


def _data_config() -> Any:
    """Splits the training data between workers in the same order on every run.

    Ray Data otherwise hands blocks to workers by locality and arrival, so a worker group restarted
    after a failure could see other rows in other batches than an uninterrupted run.
    """
    from ray.data import DataContext
    from ray.train import DataConfig

    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train"], execution_options={"train": options})


def _train(cfg: TrainConfig, work: Path, started: float) -> dict[str, Any]:
    """:func:`run_train` once Ray is up; ``work`` is a scratch directory for model copies."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    source = localize_model(cfg.init_model) if cfg.init_model else Path(cfg.encoder or default_encoder_path())
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    base_config = MultiTaskModel.config_class.from_pretrained(source) if cfg.init_model else None
    base_specs = base_config.head_specs() if base_config else None
    separator = text_separator(base_config, tokenizer)  # the rule scoring and evaluation use
    data = prepare_data(cfg, tokenizer, separator, base_specs, put=ray.put)
    new_specs = data.specs[len(base_specs or []):]
    build_initial_model(cfg, new_specs if cfg.init_model else data.specs, work / "init", tokenizer)
    log.info("training rows %d, validation rows %d, skipped (no text) %s", data.train.rows, data.validation.rows, data.skipped_rows)

    datasets = {"train": ray.data.from_arrow_refs(data.train.parts), "validation": ray.data.from_arrow_refs(data.validation.parts)}
    init_files = [ray.put(read_model_files(work / "init"))]
    feature_cache = None
    if cfg.cached:  # a frozen encoder: its pooled features once, then epochs of heads only
        datasets, feature_cache = cache_features(datasets, init_files, cfg.precision, cfg.use_gpu, cfg.num_workers)
    cpus = ray.cluster_resources().get("CPU", 1)
    storage = cfg.storage_path or os.path.abspath("outputs/ray_train")
    run_name = f"mtcls-{int(started)}"
    loop_config = {
        "specs": [s.to_dict() for s in data.specs],
        "init_files": init_files,
        "cached_features": cfg.cached,
        "train_rows": data.train.rows,
        "pad_token_id": tokenizer.pad_token_id or 0,
        "torch_threads": max(1, int(cpus // cfg.num_workers)) if not cfg.use_gpu else 2,
        "threshold_bins": cfg.threshold_bins if cfg.tune_thresholds else 0,
        "calibrate": cfg.calibrate,
        **{k: getattr(cfg, k) for k in ("seed", "freeze_encoder", "learning_rate", "weight_decay", "epochs", "batch_size",
                                         "gradient_accumulation", "warmup_ratio", "precision", "max_grad_norm",
                                         "early_stopping_patience", "best_metric", "length_grouping")},
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=cfg.best_metric, checkpoint_score_order="max"),
        ),
        datasets=datasets,
        dataset_config=_data_config(),
    )
    result = trainer.fit()
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1][cfg.best_metric])
    with result.checkpoint.as_directory() as last:
        final_state = torch.load(Path(last) / STATE_FILE, weights_only=True)
    history = final_state["history"]

    best_reports = next(h["reports"] for h in history if h["epoch"] == best_metrics["epoch"])
    tuned = {h: r["tuned_thresholds"] for h, r in best_reports.items() if "tuned_thresholds" in r}
    calibration = {h: r["calibration"] for h, r in best_reports.items() if "calibration" in r}
    temperatures = {h: c["temperature"] for h, c in calibration.items() if c["temperature"] is not None}

    out = locate(cfg.output)
    out.fs.makedirs(out.path, exist_ok=True)
    with best_ckpt.as_directory() as best_dir:
        model = MultiTaskModel.from_pretrained(best_dir)
    # The heads as validation exported them: calibration, and thresholds mapped to the calibrated scores.
    for head, report in best_reports.items():
        model.set_head_spec(HeadSpec.from_dict(report["head"]))
    model.save_pretrained(work / "best")
    for name in ("config.json", "model.safetensors"):
        out.fs.put(str(work / "best" / name), posixpath.join(out.path, name))
    for f in (work / "init").iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            out.fs.put(str(f), posixpath.join(out.path, f.name))  # tokenizer files

    summary = {
        "output": cfg.output,
        "best_epoch": best_metrics["epoch"],
        "best_metric": cfg.best_metric,
        "best_score": best_metrics[cfg.best_metric],
        "best_metrics": {k: v for k, v in best_metrics.items() if not isinstance(v, dict)},
        "epochs": [{k: v for k, v in h.items() if k != "reports"} for h in history],
        "best_reports": best_reports,
        "tuned_thresholds": tuned,
        "temperatures": temperatures,
        "calibration": calibration,
        "heads": [s.to_dict() for s in model.specs.values()],
        "rows": {"train": data.train.rows, "validation": data.validation.rows},
        "label_rows": data.label_rows,
        "skipped_rows_without_text": data.skipped_rows,
        "resumed_after_failure": final_state["resumes"],
        "optimizer_steps": optimizer_steps(final_state["optimizer"]),
        "train_examples_per_s": float(sum(h["train_examples_per_s"] for h in history) / len(history)),
        "seconds": time.time() - started,
        "feature_cache": feature_cache,
        "ray_train_run": posixpath.join(storage, run_name),
    }
    profiles = {h: r["profile"] for h, r in best_reports.items() if "profile" in r}
    write_json(out.join(REFERENCE_FILE), reference_document(profiles, f"validation set, epoch {best_metrics['epoch']}"))
    write_json(out.join("training_summary.json"), summary)
    for spec in data.specs:
        local = str(work / f"{spec.name}_training.png")
        plot_history(summary["epochs"], spec.name, local)
        out.fs.put(local, out.join(f"{spec.name}_training.png").path)
    return summary

