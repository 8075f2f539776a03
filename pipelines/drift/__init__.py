"""Drift over time: the scoring manifests of ``<key>=<value>`` partitions as one table and one plot per head."""

from pipelines.drift.config import DriftConfig
from pipelines.drift.run import run_drift

__all__ = ["DriftConfig", "run_drift"]
