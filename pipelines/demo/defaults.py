"""The embedded defaults a job falls back on: the demo corpus (its test split to score or
evaluate, its train split to train on) and the default model.

Jobs resolve them (``jobs.score``, ``jobs.evaluate``, ``jobs.train``), so no ``run_<job>`` imports
this package: scoring and evaluation never reach the training code that builds the default model,
and training does not depend on the demo.
"""

from __future__ import annotations

import logging
from typing import Optional, TypeVar

from pydantic import BaseModel

log = logging.getLogger(__name__)

C = TypeVar("C", bound=BaseModel)


def with_embedded_defaults(cfg: C, data_key: Optional[str]) -> C:
    """``cfg`` with an empty ``data_key`` set to the demo corpus's test split and an empty ``model``
    to the embedded default model (trained on first use).

    Args:
        cfg: A job config with a ``model`` key and ``data_key``.
        data_key: The key naming the job's input (``input`` for scoring, ``data`` for evaluation);
            None: the input is given another way (scoring's ``input_table``), only the model is filled in.
    """
    update: dict[str, str] = {}
    if data_key is not None and not getattr(cfg, data_key):
        from pipelines.demo.corpus import default_corpus_dir

        update[data_key] = str(default_corpus_dir() / "test.parquet")
        log.info("no %s given: using the embedded demo corpus %s", data_key, update[data_key])
    if not getattr(cfg, "model"):
        from pipelines.demo.default_model import default_model_dir

        update["model"] = str(default_model_dir())
    return cfg.model_copy(update=update) if update else cfg


def with_demo_training_data(cfg: C) -> C:
    """A training config with an empty ``train`` set to the demo corpus's train split (and the demo heads if none are given)."""
    if getattr(cfg, "train"):
        return cfg
    from pipelines.demo.corpus import DEFAULT_HEADS, default_corpus_dir

    corpus = default_corpus_dir()
    log.info("no training data given: the embedded demo corpus %s", corpus)
    return cfg.model_copy(update={"train": [str(corpus / "train.parquet")], "heads": getattr(cfg, "heads") or [dict(h) for h in DEFAULT_HEADS]})
