"""The scoring pipeline: Parquet text in, every head's predictions out.

``ScoreConfig`` and ``run_score`` are imported on first use, so a Ray worker that only needs a
light module of this package (the stages, checksums) does not import torch.
"""

from typing import Any

__all__ = ["ScoreConfig", "run_score"]


def __getattr__(name: str) -> Any:
    if name == "ScoreConfig":
        from pipelines.score.config import ScoreConfig

        return ScoreConfig
    if name == "run_score":
        from pipelines.score.run import run_score

        return run_score
    raise AttributeError(f"module 'pipelines.score' has no attribute {name!r}")
