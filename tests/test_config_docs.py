"""Every config key is documented where users look: its own entry in the class docstring's
``Attributes:`` section, and the job's ``--help``, which is generated from the class."""

import dataclasses
import importlib
import re

import pytest

from pipelines.config import (ConfigError, describe_config, docstring_attributes, format_config_help, format_value,
                              load_config)
from pipelines.drift.config import DriftConfig
from pipelines.evaluate.config import EvalConfig
from pipelines.runtime import parse_job_args
from pipelines.score.config import ScoreConfig
from pipelines.train.config import TrainConfig

# DemoConfig by name: the demo job may keep it in jobs/demo.py or pipelines/demo/run.py.
CONFIGS = [ScoreConfig, TrainConfig, EvalConfig, DriftConfig, "DemoConfig"]


@dataclasses.dataclass
class _Section:
    batch_size: int = 1


@dataclasses.dataclass
class _Nested:
    section: _Section = dataclasses.field(default_factory=_Section)


def resolve(config) -> type:
    """The config class itself; ``"DemoConfig"`` is imported from wherever the demo job keeps it."""
    if config != "DemoConfig":
        return config
    errors = []
    for module in ("pipelines.demo.run", "jobs.demo"):
        try:
            return importlib.import_module(module).DemoConfig
        except (ImportError, AttributeError) as exc:
            errors.append(f"{module}: {exc!r}")
    pytest.fail(f"DemoConfig not importable: {errors}")


def default_of(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:
        return format_value(field.default_factory())
    return format_value(field.default)


def test_the_attributes_parser_reads_google_style_entries():
    doc = """Summary.

    Attributes:
        alpha: First line
            continued here.
        beta, gamma (int): Shared meaning.
        delta:
            Meaning on the next line.

        epsilon: After a blank line. zeta: inline, so not an entry of its own.

    Note:
        eta: outside the section.
    """
    assert docstring_attributes(doc) == {
        "alpha": "First line continued here.",
        "beta": "Shared meaning.",
        "gamma": "Shared meaning.",
        "delta": "Meaning on the next line.",
        "epsilon": "After a blank line. zeta: inline, so not an entry of its own.",
    }
    assert docstring_attributes("No section here.\n\n    alpha: not an attribute.") == {}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: getattr(c, "__name__", c))
def test_every_config_key_has_its_own_docstring_entry(config):
    config = resolve(config)
    entries = docstring_attributes(config.__doc__)
    fields = [f.name for f in dataclasses.fields(config)]
    missing = [name for name in fields if not entries.get(name)]
    assert not missing, f"{config.__name__}: keys without an 'Attributes:' entry of their own: {missing}"
    stale = [name for name in entries if name not in fields]
    assert not stale, f"{config.__name__}: 'Attributes:' documents keys that do not exist: {stale}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: getattr(c, "__name__", c))
def test_describe_config_follows_the_class(config):
    config = resolve(config)
    described = {key.name: key for key in describe_config(config)}
    entries = docstring_attributes(config.__doc__)
    assert list(described) == [f.name for f in dataclasses.fields(config)]
    for field in dataclasses.fields(config):
        key = described[field.name]
        assert key.type == field.type and key.default == default_of(field) and key.meaning == entries.get(field.name, "")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: getattr(c, "__name__", c))
def test_help_lists_every_key_with_type_default_and_meaning(config, capsys):
    config = resolve(config)
    with pytest.raises(SystemExit) as exit_:
        parse_job_args(["--help"], "A job.", config)
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert format_config_help(config) in shown
    lines = shown.splitlines()
    for key in describe_config(config):
        header = f"  {key.name}: {key.type} = {key.default}"
        assert header in lines, f"--help lacks {header.strip()!r}"
        below = lines[lines.index(header) + 1:]
        wrapped = below[: next((i for i, line in enumerate(below) if not line.startswith(" " * 6)), len(below))]
        assert " ".join(line.strip() for line in wrapped) == (key.meaning or "(undocumented)")


def test_help_without_a_config_class_still_works(capsys):
    with pytest.raises(SystemExit):
        parse_job_args(["--help"], "A job.")
    assert "--config" in capsys.readouterr().out
    assert parse_job_args(["--config", "a.yaml", "x=1", "b.c=[1, 2]"], "A job.", ScoreConfig) == ("a.yaml", ["x=1", "b.c=[1, 2]"])


def test_an_unknown_key_suggests_the_closest_known_key():
    with pytest.raises(ConfigError, match=re.escape("unknown key(s) ['batch_szie']; did you mean 'batch_size'? known keys: [")):
        load_config(_Section, overrides=["batch_szie=3"])
    with pytest.raises(ConfigError, match=r"did you mean 'model' for 'modle', 'output' for 'outptu'\?"):
        load_config(ScoreConfig, overrides=["modle=x", "outptu=y"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['zzz'\]; known keys: \["):
        load_config(ScoreConfig, overrides=["zzz=1"])
    with pytest.raises(ConfigError, match=re.escape("['section.batch_szie']; did you mean 'section.batch_size'?")):
        load_config(_Nested, overrides=["section.batch_szie=2"])
    with pytest.raises(ConfigError, match=re.escape("['sectoin']; did you mean 'section'?")):
        load_config(_Nested, overrides=["sectoin.batch_size=2"])
