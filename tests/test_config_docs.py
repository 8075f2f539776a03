"""Every config key is defined, validated and documented in one place, its job's pydantic model:
``--help`` and the README's key tables are generated from it, and every validation failure is one
``ConfigError`` line naming the key, the value and what was expected."""

import dataclasses
import importlib
import re
import typing

import pytest
from pydantic import Field, ValidationError

from mtcls import PRECISIONS, HeadSpec, kind_names
from pipelines import config_docs
from pipelines.config import (ConfigError, InferencePrecision, JobConfig, TrainPrecision, config_to_dict, describe_config,
                              format_config_help, format_value, load_config, plain_meaning, validate_config)
from pipelines.drift.config import DriftConfig
from pipelines.evaluate.config import EvalConfig
from pipelines.runtime import parse_job_args
from pipelines.score.config import ScoreConfig
from pipelines.train.config import TrainConfig, TrainHead

# DemoConfig by name: the demo job may keep it in jobs/demo.py or pipelines/demo/.
CONFIGS = [ScoreConfig, TrainConfig, EvalConfig, DriftConfig, "DemoConfig"]
TRAIN = ["train=[x.parquet]"]


class _Section(JobConfig):
    batch_size: int = Field(1, ge=1, description="Rows per batch.")


class _Nested(JobConfig):
    section: _Section = Field(default_factory=_Section, description="A section of keys.")


def resolve(config) -> type:
    """The config model itself; ``"DemoConfig"`` is imported from wherever the demo job keeps it."""
    if config != "DemoConfig":
        return config
    errors = []
    for module in ("pipelines.demo.config", "pipelines.demo.run", "jobs.demo"):
        try:
            return importlib.import_module(module).DemoConfig
        except (ImportError, AttributeError) as exc:
            errors.append(f"{module}: {exc!r}")
    pytest.fail(f"DemoConfig not importable: {errors}")


def fails(cls, *overrides: str) -> str:
    """The one-line message of the ConfigError that loading ``cls`` with ``overrides`` raises."""
    with pytest.raises(ConfigError) as error:
        load_config(cls, None, list(overrides))
    message = str(error.value)
    assert "\n" not in message and "pydantic" not in message, message
    return message


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: getattr(c, "__name__", c))
def test_every_config_key_has_a_description(config):
    config = resolve(config)
    assert issubclass(config, JobConfig)
    missing = [name for name, field in config.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"{config.__name__}: keys without a Field(description=...): {missing}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: getattr(c, "__name__", c))
def test_describe_config_follows_the_model(config):
    config = resolve(config)
    described = {key.name: key for key in describe_config(config)}
    assert list(described) == list(config.model_fields)
    for name, field in config.model_fields.items():
        assert described[name].default == format_value(field.get_default(call_default_factory=True))
        assert described[name].meaning == field.description


def test_described_types_show_choices_bounds_and_nesting():
    score = {key.name: key.type for key in describe_config(ScoreConfig)}
    train = {key.name: key.type for key in describe_config(TrainConfig)}
    assert score["precision"] == "auto | fp32 | bf16 | fp16 | int8"
    assert score["embedding_dtype"] == "float32 | float16"
    assert score["block_rows"] == "int >= 1" and score["num_cpus_per_actor"] == "float > 0"
    assert score["text_columns"] == "list[str]" and score["input"] == "str"
    assert train["validation_fraction"] == "float in (0, 1)" and train["warmup_ratio"] == "float in [0, 1)"
    assert train["cache_features"] == "bool | null" and train["heads"] == "list[TrainHead]"
    assert {key.name: key.type for key in describe_config(EvalConfig)}["label_columns"] == "dict[str, str]"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: getattr(c, "__name__", c))
def test_help_lists_every_key_with_type_default_and_meaning(config, capsys):
    config = resolve(config)
    with pytest.raises(SystemExit) as exit_:
        parse_job_args(["--help"], "A job.", config)
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert format_config_help(config) in shown
    assert "](#" not in shown, "README links must read as plain text in --help"
    lines = shown.splitlines()
    for key in describe_config(config):
        header = f"  {key.name}: {key.type} = {key.default}"
        assert header in lines, f"--help lacks {header.strip()!r}"
        below = lines[lines.index(header) + 1:]
        wrapped = below[: next((i for i, line in enumerate(below) if not line.startswith(" " * 6)), len(below))]
        assert " ".join(line.strip() for line in wrapped) == " ".join(plain_meaning(key.meaning).split())


def test_readme_links_read_as_text_in_help():
    assert plain_meaning("(see [Output table](#output-table)).") == '(see "Output table" in the README).'
    assert plain_meaning("a [link](https://example.com) stays") == "a [link](https://example.com) stays"


def test_help_without_a_config_class_still_works(capsys):
    with pytest.raises(SystemExit):
        parse_job_args(["--help"], "A job.")
    assert "--config" in capsys.readouterr().out
    assert parse_job_args(["--config", "a.yaml", "x=1", "b.c=[1, 2]"], "A job.", ScoreConfig) == ("a.yaml", ["x=1", "b.c=[1, 2]"])


def test_an_unknown_key_suggests_the_closest_known_key():
    assert fails(_Section, "batch_szie=3").startswith(
        "unknown key(s) ['batch_szie']; did you mean 'batch_size'? known keys: ['batch_size']")
    assert re.search(r"did you mean 'model' for 'modle', 'output' for 'outptu'\?", fails(ScoreConfig, "modle=x", "outptu=y"))
    assert re.match(r"unknown key\(s\) \['zzz'\]; known keys: \['block_rows', ", fails(ScoreConfig, "zzz=1"))
    assert "['section.batch_szie']; did you mean 'section.batch_size'? known keys: ['section.batch_size']" in fails(
        _Nested, "section.batch_szie=2")
    assert "['sectoin']; did you mean 'section'?" in fails(_Nested, "sectoin.batch_size=2")
    assert load_config(_Nested, None, ["section.batch_size=2"]).section.batch_size == 2
    assert fails(_Nested, "section.batch_size=0") == "key 'section.batch_size': must be >= 1, got 0"


def test_a_bad_choice_names_the_key_and_the_allowed_values():
    assert fails(ScoreConfig, "precision=fp8") == "key 'precision': expected one of ['auto', 'fp32', 'bf16', 'fp16', 'int8'], got 'fp8'"
    assert fails(ScoreConfig, "embedding_dtype=bf16") == "key 'embedding_dtype': expected one of ['float32', 'float16'], got 'bf16'"
    assert fails(TrainConfig, "pooling=max") == "key 'pooling': expected one of ['mean', 'cls'], got 'max'"
    assert fails(DriftConfig, "root=x", "format=json") == "key 'format': expected one of ['csv', 'parquet'], got 'json'"
    assert fails(TrainConfig, "precision=int8") == (
        "key 'precision': expected one of ['auto', 'fp32', 'bf16', 'fp16'] (int8 is an inference precision), got 'int8'")


@pytest.mark.parametrize("cls, overrides, message", [
    (ScoreConfig, ["block_rows=abc"], "key 'block_rows': expected int, got str 'abc'"),
    (ScoreConfig, ["block_rows=2.5"], "key 'block_rows': expected int, got float 2.5"),
    (ScoreConfig, ["overwrite=1"], "key 'overwrite': expected bool, got int 1"),
    (ScoreConfig, ["output="], "key 'output': expected str, got null"),
    (ScoreConfig, ["text_columns=abc"], "key 'text_columns': expected a list, got str 'abc'"),
    (ScoreConfig, ["heads=[a, 1]"], "key 'heads[1]': expected str, got int 1"),
    (ScoreConfig, ["max_length=-1"], "key 'max_length': must be >= 0, got -1"),
    (ScoreConfig, ["num_cpus_per_actor=0"], "key 'num_cpus_per_actor': must be > 0, got 0"),
    (ScoreConfig, ["lock_timeout_s=0.5"], "key 'lock_timeout_s': must be >= 1, got 0.5"),
    (ScoreConfig, ["drift_threshold=.inf"], "key 'drift_threshold': must be a positive number, got inf"),
    (TrainConfig, ["epochs=true"], "key 'epochs': expected int, got bool True"),
    (TrainConfig, ["validation_fraction=1.5"], "key 'validation_fraction': must be in (0, 1), got 1.5"),
    (TrainConfig, ["warmup_ratio=1"], "key 'warmup_ratio': must be in [0, 1), got 1"),
    (TrainConfig, ["learning_rate=0"], "key 'learning_rate': must be > 0, got 0"),
    (TrainConfig, ["cache_features=maybe"], "key 'cache_features': expected bool | null, got str 'maybe'"),
    (EvalConfig, ["label_columns=[a]"], "key 'label_columns': expected a mapping, got list ['a']"),
    (EvalConfig, ["label_columns.type=3"], "key 'label_columns.type': expected str, got int 3"),
    (EvalConfig, ["threshold_bins=0"], "key 'threshold_bins': must be >= 1, got 0"),
    (DriftConfig, ["root=x", "partition_key=a=b"], "key 'partition_key': a directory key name without '/' or '=', got 'a=b'"),
    (DriftConfig, [], "key 'root': a scores root is required"),
    (resolve("DemoConfig"), ["rows=99"], "key 'rows': must be >= 100, got 99"),
])
def test_a_bad_value_names_the_key_the_value_and_what_was_expected(cls, overrides, message):
    assert fails(cls, *overrides) == message


def test_several_problems_are_reported_on_one_line_unknown_keys_first():
    message = fails(ScoreConfig, "block_rows=0", "precison=fp32", "embedding_dtype=x")
    assert message.startswith("unknown key(s) ['precison']; did you mean 'precision'?")
    assert "; key 'block_rows': must be >= 1, got 0" in message
    assert "; key 'embedding_dtype': expected one of ['float32', 'float16'], got 'x'" in message


def test_yaml_numbers_and_tuples_are_read_as_the_key_expects():
    cfg = load_config(TrainConfig, None, ["learning_rate=1e-4", "weight_decay=0"])  # YAML 1.1: "1e-4" is a string
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.weight_decay, float)
    assert load_config(ScoreConfig, None, ["num_gpus_per_actor=1"]).num_gpus_per_actor == 1.0
    assert ScoreConfig(text_columns=("title", "abstract")).text_columns == ["title", "abstract"]
    assert "key 'learning_rate': expected float, got str 'fast'" == fails(TrainConfig, "learning_rate=fast")


def test_a_config_built_in_code_is_validated_like_one_loaded():
    for make, message in [
        (lambda: ScoreConfig(block_rows=0), "key 'block_rows': must be >= 1, got 0"),
        (lambda: ScoreConfig(embedding_dtype="bf16"), "key 'embedding_dtype': expected one of ['float32', 'float16'], got 'bf16'"),
        (lambda: ScoreConfig(modle="x"), "unknown key(s) ['modle']; did you mean 'model'?"),
        (lambda: ScoreConfig(from_embeddings=True, precision="bf16"), "key 'precision': from_embeddings runs only the heads"),
        (lambda: DriftConfig(), "key 'root': a scores root is required"),
        (lambda: TrainConfig(train=["x"], heads=[{"name": "h", "kind": "nope"}]), "key 'heads[0].kind': unknown head kind 'nope'"),
    ]:
        with pytest.raises(ConfigError) as error:
            make()
        assert type(error.value) is ConfigError and not isinstance(error.value, ValidationError)
        assert str(error.value).startswith(message)


def test_nested_head_spec_errors_name_the_entry_and_its_field():
    head = "{name: a, kind: binary, labels: [n, y]}"
    assert fails(TrainConfig, *TRAIN, f"heads=[{head}, {{name: b, kind: bogus}}]") == (
        f"key 'heads[1].kind': unknown head kind 'bogus'; expected one of {kind_names()}")
    assert fails(TrainConfig, *TRAIN, "heads=[{name: h, kind: multiclass, labels: [a, a]}]") == (
        "key 'heads[0].labels': head 'h': duplicate label name 'a'")
    assert fails(TrainConfig, *TRAIN, "heads=[{name: a, kind: binary, labels: [n, y], dropout: 2}]").startswith(
        "key 'heads[0].dropout': head 'a': must be in [0, 1)")
    assert fails(TrainConfig, *TRAIN, "heads=[{name: 1x, kind: binary, labels: [n, y]}]").startswith(
        "key 'heads[0].name': head name '1x' is invalid")
    assert fails(TrainConfig, *TRAIN, "heads=[{name: h, kind: distribution}]") == (
        "key 'heads[0].labels': head 'h': a distribution head needs 'labels' (they cannot be inferred)")
    assert fails(TrainConfig, *TRAIN, f"heads=[{head}, {{kind: binary}}]") == "missing required key(s) ['heads[1].name']"
    assert fails(TrainConfig, *TRAIN, "heads=[x]") == "key 'heads[0]': expected a mapping, got str 'x'"
    # YAML reads a bare NO or YES as a boolean: the message names the label.
    assert fails(TrainConfig, *TRAIN, "heads=[{name: a, kind: binary, labels: [NO, 'YES']}]") == (
        "key 'heads[0].labels[0]': expected str, got bool False")
    assert fails(TrainConfig, *TRAIN, "heads=[{name: h, kind: multiclass, labelz: [a]}]").startswith(
        "key 'heads[0]' ('h'): unknown field(s) ['labelz']; did you mean 'labels'? known fields: ['activation', ")
    assert fails(TrainConfig, *TRAIN, "heads=[]") == "key 'heads': at least one head is required"


def test_a_head_entry_stays_the_dict_that_was_given():
    cfg = load_config(TrainConfig, None, [*TRAIN, "heads=[{name: a, kind: multilabel, pos_weight: balanced, column: c}]",
                                          "best_metric=a_tuned_macro_f1"])
    assert cfg.heads == [{"name": "a", "kind": "multilabel", "pos_weight": "balanced", "column": "c"}]
    assert type(cfg.heads[0]) is dict and "labels" not in cfg.heads[0] and cfg.head_column(cfg.heads[0]) == "c"


def test_a_head_entry_has_exactly_the_head_spec_fields_and_column():
    spec_fields = {f.name for f in dataclasses.fields(HeadSpec)}
    assert set(typing.get_type_hints(TrainHead)) == spec_fields | {"column"}
    assert TrainHead.__required_keys__ == {"name", "kind"}


def test_precision_choices_follow_mtcls():
    assert typing.get_args(InferencePrecision) == tuple(PRECISIONS)
    assert typing.get_args(TrainPrecision) == tuple(p for p in PRECISIONS if p != "int8")


def test_a_config_survives_plain_data_and_copies():
    cfg = load_config(TrainConfig, None, [*TRAIN, "heads=[{name: a, kind: binary, labels: [n, y]}]", "learning_rate=1e-4"])
    assert validate_config(TrainConfig, config_to_dict(cfg)) == cfg
    copy = cfg.model_copy(update={"epochs": 7})
    assert (copy.epochs, cfg.epochs) == (7, 3) and copy.heads == cfg.heads
    with pytest.raises(ConfigError, match=r"^key 'epochs': must be >= 1, got 0$"):
        validate_config(TrainConfig, {**config_to_dict(cfg), "epochs": 0})


# ---------------------------------------------------------------- the README's key tables


def table_keys(readme: str, job: str) -> list[str]:
    match = re.search(rf"<!-- keys:{job}\b[^>]*-->\n\| key \| default \| meaning \|\n\|[-| ]+\|\n((?:\|.*\|\n)+)<!-- /keys:{job} -->", readme)
    assert match, f"README has no generated key table for {job}"
    return [re.fullmatch(r"`(\w+)`", row.split("|")[1].strip())[1] for row in match[1].splitlines()]


def test_the_readme_key_tables_are_the_generated_ones():
    readme = config_docs.README.read_text()
    assert config_docs.stale_tables(readme) == [], "README key tables are stale: run python -m pipelines.config_docs"
    for job in config_docs.TABLES:
        assert table_keys(readme, job) == list(config_docs.config_class(job).model_fields)


def test_the_generator_rewrites_a_stale_table_and_check_reports_it(tmp_path, capsys):
    readme = config_docs.README.read_text()
    stale = readme.replace("| `rows_per_file` | `100000` |", "| `rows_per_file` | `1000` |")
    stale = re.sub(r"\| `partition_key` \|.*\n", "", stale)
    assert stale != readme
    path = tmp_path / "README.md"
    path.write_text(stale)
    assert config_docs.stale_tables(stale) == ["score", "drift"]
    assert config_docs.main(["--check", "--readme", str(path)]) == 1 and path.read_text() == stale
    assert config_docs.main(["--readme", str(path)]) == 0
    assert path.read_text() == readme
    assert config_docs.main(["--check", "--readme", str(path)]) == 0
    assert config_docs.main(["--print", "drift"]) == 0
    assert capsys.readouterr().out.endswith(config_docs.key_table(DriftConfig))
    with pytest.raises(ValueError, match=r"no key table for \['train'\]"):
        config_docs.update_tables(re.sub(r"<!-- keys:train\b.*?<!-- /keys:train -->", "", readme, flags=re.S))
