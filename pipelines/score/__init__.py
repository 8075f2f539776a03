"""The scoring pipeline: Parquet text in, every head's predictions out."""

from pipelines.score.config import ScoreConfig
from pipelines.score.run import run_score

__all__ = ["ScoreConfig", "run_score"]
