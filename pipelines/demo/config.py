"""``DemoConfig``: the demo job's keys, validated before any work starts."""

from __future__ import annotations

from pydantic import Field

from pipelines.config import JobConfig


class DemoConfig(JobConfig):
    """Config of ``jobs.demo``."""

    output: str = Field("outputs/demo", description="Directory for the model, the predictions and the report.")
    rows: int = Field(2000, ge=100, description="Corpus rows per split (train and test).")
    epochs: int = Field(2, ge=1, description="Fine-tuning epochs.")
    progress: bool = Field(True, description=(
        "Ray Data's progress bars, shown only with `verbose=true` (`false` hides them then too)."))
    verbose: bool = Field(False, description=(
        "Show Ray's progress bars and INFO logs on the console, in every step; Ray's log files keep "
        "everything either way (see [Console output](#console-output))."))
