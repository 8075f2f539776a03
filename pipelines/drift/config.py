"""``DriftConfig``: the drift job's keys, validated before any work starts."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.config import ConfigError


@dataclass
class DriftConfig:
    """Config of ``jobs.drift``.

    Attributes:
        root: Scores root (any fsspec URI) holding one scoring output per partition directory
            ``<partition_key>=<value>`` (for example ``date=2026-11-23``), each with its
            ``_manifest.json``.
        output: Where the table and the plots go; empty: ``<root>/_drift``.
        partition_key: Name of the partition directories' key.
        format: ``csv`` or ``parquet``: the table ``drift.<format>``, one row per partition,
            head, part (group or label, for grouped and multilabel heads) and label.
    """

    root: str = ""
    output: str = ""
    partition_key: str = "date"
    format: str = "csv"

    def __post_init__(self) -> None:
        if not self.root:
            raise ConfigError("key 'root': a scores root is required")
        if not self.partition_key or "/" in self.partition_key or "=" in self.partition_key:
            raise ConfigError(f"key 'partition_key': a directory key name without '/' or '=', got {self.partition_key!r}")
        if self.format not in ("csv", "parquet"):
            raise ConfigError(f"key 'format': expected 'csv' or 'parquet', got {self.format!r}")
