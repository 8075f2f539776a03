"""Every shipped YAML validates, and states the command that runs it on its first line."""

from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.evaluation import EvalConfig
from pipelines.scoring import ScoreConfig
from pipelines.train_data import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIG_CLASSES = {"score": ScoreConfig, "evaluate": EvalConfig, "train": TrainConfig}
YAMLS = sorted((ROOT / "jobs" / "configs").rglob("*.yaml"))


def test_there_are_configs_for_every_job():
    assert {p.parent.name for p in YAMLS} == set(CONFIG_CLASSES)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_validates_and_names_its_command(path):
    job = path.parent.name
    load_config(CONFIG_CLASSES[job], path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"python -m jobs.{job} --config jobs/configs/{job}/{path.name}" in first
