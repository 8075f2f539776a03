"""The training pipeline: labelled Parquet -> Ray Train DDP fine-tuning -> a saved model."""

from pipelines.train.config import TrainConfig
from pipelines.train.run import run_train

__all__ = ["TrainConfig", "run_train"]
