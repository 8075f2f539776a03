"""The embedded defaults a job falls back on: the demo corpus's test split and the default model.

Jobs resolve them (``jobs.score``, ``jobs.evaluate``), so ``run_score`` and ``run_evaluate`` never
import this package, nor through it the training code that builds the default model.
"""

from __future__ import annotations

import logging
from typing import TypeVar

from pydantic import BaseModel

log = logging.getLogger(__name__)

C = TypeVar("C", bound=BaseModel)


def with_embedded_defaults(cfg: C, data_key: str) -> C:
    """``cfg`` with an empty ``data_key`` set to the demo corpus's test split and an empty ``model``
    to the embedded default model (trained on first use).

    Args:
        cfg: A job config with a ``model`` key and ``data_key``.
        data_key: The key naming the job's input (``input`` for scoring, ``data`` for evaluation).
    """
    update: dict[str, str] = {}
    if not getattr(cfg, data_key):
        from pipelines.demo.corpus import default_corpus_dir

        update[data_key] = str(default_corpus_dir() / "test.parquet")
        log.info("no %s given: using the embedded demo corpus %s", data_key, update[data_key])
    if not getattr(cfg, "model"):
        from pipelines.demo.default_model import default_model_dir

        update["model"] = str(default_model_dir())
    return cfg.model_copy(update=update) if update else cfg
