"""``DemoConfig``: the demo job's keys, validated before any work starts."""

from __future__ import annotations

from pydantic import Field

from pipelines.config import JobConfig


class DemoConfig(JobConfig):
    """Config of ``jobs.demo``."""

    output: str = Field("outputs/demo", description="Directory for the model, the predictions and the report.")
    rows: int = Field(2000, ge=100, description="Corpus rows per split (train and test).")
    epochs: int = Field(2, ge=1, description="Fine-tuning epochs.")
    progress: bool = Field(True, description="Show Ray Data progress bars.")
