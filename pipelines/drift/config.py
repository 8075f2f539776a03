"""``DriftConfig``: the drift job's keys, validated before any work starts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config import ConfigError, JobConfig


class DriftConfig(JobConfig):
    """Config of ``jobs.drift``."""

    root: str = Field("", description=(
        "Scores root (any fsspec URI) holding one scoring output per partition directory "
        "`<partition_key>=<value>` (for example `date=2026-11-23`), each with its `_manifest.json`."))
    output: str = Field("", description="Where the table and the plots go; empty: `<root>/_drift`.")
    partition_key: str = Field("date", description="Name of the partition directories' key.")
    format: Literal["csv", "parquet"] = Field("csv", description=(
        "`csv` or `parquet`: the table `drift.<format>`, one row per partition, head, part (group or label, for grouped "
        "and multilabel heads) and label."))
    allow_incomplete: bool = Field(False, description=(
        "Read partitions whose scoring output is not complete (no `_SUCCESS`, or a manifest whose "
        "status is incomplete) instead of failing; partitions without a manifest are skipped. "
        "Either is logged as a warning and listed in `drift_summary.json` (`incomplete_partitions`)."))
    verbose: bool = Field(False, description=(
        "Show the INFO logs of the libraries it uses on the console (see [Console output](#console-output))."))

    @field_validator("partition_key")
    @classmethod
    def _directory_key(cls, value: str) -> str:
        if not value or "/" in value or "=" in value:
            raise ValueError(f"a directory key name without '/' or '=', got {value!r}")
        return value

    @model_validator(mode="after")
    def _root_given(self) -> "DriftConfig":
        if not self.root:  # checked after the fact: the default is empty
            raise ConfigError("key 'root': a scores root is required")
        return self
