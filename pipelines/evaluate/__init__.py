"""The evaluation pipeline: per-head reports, aggregated exactly across shards."""

from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.run import run_evaluate

__all__ = ["EvalConfig", "run_evaluate"]
