"""Every shipped YAML validates with the command on its first line, and none scores real data with the demo model."""

import json
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.config import REQUIRED, ConfigError, config_to_dict, load_config, validate_config
from pipelines.evaluate.config import EvalConfig
from pipelines.score.config import ScoreConfig
from pipelines.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIG_CLASSES = {"score": ScoreConfig, "evaluate": EvalConfig, "train": TrainConfig}
YAMLS = sorted((ROOT / "jobs" / "configs").rglob("*.yaml"))
# The key naming the rows a job scores with ``model``; empty means the embedded demo corpus.
SCORED_INPUT = {"score": "input", "evaluate": "data"}


def header_overrides(path: Path) -> list[str]:
    """The ``key=value`` arguments the YAML's first line passes after ``--config <the YAML>``."""
    job = path.parent.name
    command = f"python -m jobs.{job} --config jobs/configs/{job}/{path.name}"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and command in first, f"{path.name}: first line must be '# ... {command} ...'"
    overrides = shlex.split(first.split(command, 1)[1])
    assert all("=" in token for token in overrides), f"{path.name}: only key=value may follow --config: {overrides}"
    return overrides


def test_there_are_configs_for_every_job():
    assert {p.parent.name for p in YAMLS} == set(CONFIG_CLASSES)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_validates_with_the_command_on_its_first_line(path):
    cls = CONFIG_CLASSES[path.parent.name]
    cfg = load_config(cls, path, header_overrides(path))
    # Every key the YAML sets is taken as written (nothing silently dropped or renamed).
    raw = yaml.safe_load(path.read_text()) or {}
    assert set(raw) <= set(cfg.model_fields_set)
    # The manifest's form of the config (JSON of config_to_dict) validates back to the same config.
    assert validate_config(cls, json.loads(json.dumps(config_to_dict(cfg)))) == cfg


@pytest.mark.parametrize("path", [p for p in YAMLS if p.parent.name in SCORED_INPUT],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_config_that_scores_real_data_names_a_model(path):
    job = path.parent.name
    source = SCORED_INPUT[job]
    raw = yaml.safe_load(path.read_text()) or {}
    if raw.get(source):
        # Left empty or out, ``model`` falls back to the embedded demo model: a silent wrong answer.
        assert raw.get("model"), f"{path.name} scores {raw[source]!r} but leaves 'model' empty; use 'model: {REQUIRED}'"
    cfg = load_config(CONFIG_CLASSES[job], path, header_overrides(path))
    if getattr(cfg, source):
        assert cfg.model and cfg.model != REQUIRED, f"{path.name}: its command scores real data with the demo model"


def test_a_key_left_required_fails_without_the_command_line():
    marked = {p: k for p in YAMLS for k, v in (yaml.safe_load(p.read_text()) or {}).items() if v == REQUIRED}
    assert ROOT / "jobs/configs/score/goemotions.yaml" in marked
    for path, key in marked.items():
        with pytest.raises(ConfigError, match=rf"\['{key}'\] must be given on the command line"):
            load_config(CONFIG_CLASSES[path.parent.name], path)
        assert any(o.startswith(f"{key}=") for o in header_overrides(path)), f"{path.name}: its command omits {key}="
