"""The embedded default model: the packaged all-MiniLM-L6-v2 fine-tuned on the demo corpus, built on first use."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipelines.demo.corpus import DEFAULT_HEADS, SAMPLE_VERSION, cache_dir, default_corpus_dir
from pipelines.train.config import TrainConfig

log = logging.getLogger(__name__)


def default_train_config(output: str, rows: int = 2000, **overrides: object) -> TrainConfig:
    """The training job's config for the embedded default model (and the demo)."""
    corpus = default_corpus_dir(rows)
    values = dict(train=[str(corpus / "train.parquet")], output=output,
                  heads=[dict(h) for h in DEFAULT_HEADS], epochs=2, batch_size=32, learning_rate=1e-4,
                  max_length=64, storage_path=str(cache_dir() / "ray_train"))
    values.update(overrides)
    return TrainConfig(**values)


def default_model_dir() -> Path:
    """The embedded default model, trained by the project's training job on first use.

    Equivalent command: ``python -m jobs.train --config jobs/configs/train/default.yaml
    output=~/.cache/mtcls/default-model-v2`` (about two minutes on 2 CPUs). Starts a local Ray if
    none is running.
    """
    from pipelines.train.run import run_train

    target = cache_dir() / f"default-model-{SAMPLE_VERSION}"
    if not (target / "model.safetensors").is_file():
        log.info("training the embedded default model into %s (first use only)", target)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        run_train(default_train_config(str(tmp)))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target

