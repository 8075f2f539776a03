"""Every config key a user can set is documented where users look: the config's docstring."""

import dataclasses
import re

import pytest

from pipelines.evaluation import EvalConfig
from pipelines.scoring import ScoreConfig
from pipelines.train_data import TrainConfig


@pytest.mark.parametrize("config", [ScoreConfig, TrainConfig, EvalConfig], ids=lambda c: c.__name__)
def test_every_config_key_is_documented(config):
    doc = config.__doc__ or ""
    missing = [f.name for f in dataclasses.fields(config) if not re.search(rf"\b{re.escape(f.name)}\b", doc)]
    assert not missing, f"{config.__name__} keys without documentation: {missing}"
