"""Fine-tuning on Ray Train: prepare data on the driver, run the DDP loop, export the best epoch.

The output directory is what ``jobs.score`` loads as is: ``config.json`` + ``model.safetensors`` +
the tokenizer, plus ``training_summary.json`` (per-epoch metrics and per-head reports) and one
``<head>_training.png`` (loss and macro-F1 per epoch) per head, and ``reference_profile.json``:
the exported model's prediction profile of the validation set (:mod:`pipelines.train.reference`),
the reference that scoring measures drift against.
"""

from __future__ import annotations

import copy
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
from mtcls.configuration import position_limit
from mtcls.profile import REFERENCE_FILE, reference_document
from pipelines.artifacts import check_model_target, localize_model, publish_model_dir, read_model_files
from pipelines.config import ConfigError, check_max_length
from pipelines.runtime import init_ray, ray_train_logging
from pipelines.storage import locate, redact_uri, write_json
from pipelines.train.plots import plot_history
from pipelines.train.config import TrainConfig
from pipelines.train.data import prepare_data
from pipelines.train.features import cache_features
from pipelines.train.loop import STATE_FILE, train_loop_per_worker
from pipelines.train.loop_config import LoopConfig

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

    ``train`` must be given (``jobs.train`` fills in the embedded demo corpus when it is empty).

    Returns:
        The training summary (also written to ``<output>/training_summary.json``).

    Raises:
        ConfigError: ``train`` is empty.
    """
    if not cfg.train:
        raise ConfigError("key 'train': run_train needs training data (jobs.train fills in the embedded demo corpus)")
    check_model_target(cfg.output)  # refuse a directory that is not a model's before training, not after
    check_max_length(cfg.max_length, position_limit(_starting_encoder(cfg)), explicit=True)
    init_ray(cfg.verbose)
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="mtcls-train-"))
    try:
        return _train(cfg, work, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _starting_encoder(cfg: TrainConfig) -> dict[str, Any]:
    """The config (``to_dict()``) of the encoder training starts from: ``init_model``'s, or ``encoder``'s."""
    from transformers import AutoConfig

    if cfg.init_model:
        return MultiTaskModel.config_class.from_pretrained(localize_model(cfg.init_model)).encoder
    encoder = cfg.encoder or str(default_encoder_path())
    return AutoConfig.from_pretrained(localize_model(encoder) if "://" in encoder else encoder).to_dict()


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
    loop_config = LoopConfig.from_train_config(
        cfg, heads=data.specs, init_files=init_files, train_rows=data.train.rows, pad_token_id=tokenizer.pad_token_id or 0,
        torch_threads=max(1, int(cpus // cfg.num_workers)) if not cfg.use_gpu else 2)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config.as_train_loop_config(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=cfg.best_metric, checkpoint_score_order="max"),
            logging_config=ray_train_logging(),  # Ray Train's INFO lines on the console only with verbose=true
        ),
        datasets=datasets,
        dataset_config=_data_config(),
    )
    result = trainer.fit()
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1][cfg.best_metric])
    with result.checkpoint.as_directory() as last:
        final_state = torch.load(Path(last) / STATE_FILE, weights_only=True)
    history = final_state["history"]

    best = next(h for h in history if h["epoch"] == best_metrics["epoch"])
    best_reports = best["reports"]
    tuned = {h: r["tuned_thresholds"] for h, r in best_reports.items() if "tuned_thresholds" in r}
    calibration = {h: r["calibration"] for h, r in best_reports.items() if "calibration" in r}
    temperatures = {h: c["temperature"] for h, c in calibration.items() if c["temperature"] is not None}

    with best_ckpt.as_directory() as best_dir:
        model = MultiTaskModel.from_pretrained(best_dir)
    # The heads as validation exported them: calibration, and thresholds mapped to the calibrated scores.
    for spec in best["heads"].values():
        model.set_head_spec(HeadSpec.from_dict(spec))

    summary = {
        "output": redact_uri(cfg.output),
        "best_epoch": best_metrics["epoch"],
        "best_metric": cfg.best_metric,
        "best_score": best_metrics[cfg.best_metric],
        "best_metrics": {k: v for k, v in best_metrics.items() if not isinstance(v, dict)},
        "epochs": [{k: v for k, v in h.items() if k not in ("reports", "heads", "profiles")} for h in history],
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
        "ray_train_run": redact_uri(posixpath.join(storage, run_name)),
    }
    reference = reference_document(best["profiles"], f"validation set, epoch {best_metrics['epoch']}")
    export_trained_model(cfg.output, model, work / "init", summary, reference, [s.name for s in data.specs], work / "export")
    return summary


def export_trained_model(output: str, model: MultiTaskModel, tokenizer_dir: Path, summary: dict[str, Any],
                         reference: dict[str, Any], plot_heads: list[str], staging: Path) -> None:
    """Writes the whole model directory locally, then publishes it at ``output`` in one step.

    The directory is the model (``config.json``, ``model.safetensors``), the tokenizer files of
    ``tokenizer_dir``, ``reference_profile.json``, ``training_summary.json`` and one
    ``<head>_training.png`` per head in ``plot_heads``. :func:`~pipelines.artifacts.publish_model_dir`
    replaces what ``output`` held as a whole, so no file of an earlier model (such as the plot of
    a head this model does not have) stays, and a scorer loading meanwhile gets either model whole.

    Args:
        output: The model directory URI.
        model: The model to export.
        tokenizer_dir: A directory holding the tokenizer files (its config and weights are ignored).
        summary: ``training_summary.json`` (``epochs`` is plotted).
        reference: ``reference_profile.json``.
        plot_heads: Heads to plot.
        staging: An empty or absent local scratch directory to write the files into.

    Raises:
        InputError: When ``output`` exists and is not an mtcls model directory.
    """
    staging.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copyfile(f, staging / f.name)
    write_json(locate(str(staging / REFERENCE_FILE)), reference)
    write_json(locate(str(staging / "training_summary.json")), summary)
    for head in plot_heads:
        plot_history(summary["epochs"], head, str(staging / f"{head}_training.png"))
    publish_model_dir(staging, output)

