"""The README's promises: its two opening commands, job command lines that the jobs accept, a key
table that matches ``ScoreConfig``, and a library example that runs as written."""

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from pipelines.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
JOB_COMMAND = re.compile(r"\bpython3? -m jobs\.(\w+)(.*)")
SHELL_SEPARATORS = {"&&", "||", ";", "|", "&"}


def config_class(job: str) -> type:
    """The config model of ``jobs.<job>``, imported only when a test needs it."""
    locations = {
        "score": ["pipelines.score.config:ScoreConfig"],
        "train": ["pipelines.train.config:TrainConfig"],
        "evaluate": ["pipelines.evaluate.config:EvalConfig"],
        "drift": ["pipelines.drift.config:DriftConfig"],
        "demo": ["pipelines.demo.run:DemoConfig", "jobs.demo:DemoConfig"],
    }[job]
    errors = []
    for location in locations:
        module, name = location.split(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            errors.append(f"{location}: {exc!r}")
    pytest.fail(f"config class of jobs.{job} not importable: {errors}")


def job_commands() -> list[tuple[str, list[str]]]:
    """Every ``python -m jobs.<job> ARGS`` in the README's code blocks, as (job, ARGS tokens)."""
    commands = []
    for lang, body in FENCED.findall(README):
        if lang == "python":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            for match in JOB_COMMAND.finditer(line):
                tokens = shlex.split(match[2], comments=True)
                end = next((i for i, t in enumerate(tokens) if t in SHELL_SEPARATORS), len(tokens))
                commands.append((match[1], tokens[:end]))
    return commands


def split_arguments(tokens: list[str]) -> tuple[str | None, list[str]]:
    """A job's arguments as its parser sees them: the ``--config`` file and the ``key=value`` overrides."""
    config, overrides, rest = None, [], iter(tokens)
    for token in rest:
        if token == "--config":
            config = next(rest)
        else:
            assert "=" in token and not token.startswith("-"), f"README passes {token!r}, not key=value, to a job"
            overrides.append(token)
    return config, overrides


def test_readme_opens_with_exactly_the_two_commands_and_ci_runs_the_second():
    intro = README[: README.index("\n## ")]
    blocks = FENCED.findall(intro)
    assert [lang for lang, _ in blocks] == ["bash", "bash"], "the README must open with two bash blocks"
    setup_and_run, setup_and_test = (body.strip() for _, body in blocks)
    for command, module in ((setup_and_run, "jobs.demo"), (setup_and_test, "pytest")):
        assert "\n" not in command, f"one command per block: {command!r}"
        last = shlex.split(command.split("&&")[-1])
        assert Path(last[0]).name in ("python", "python3") and last[1:3] == ["-m", module], command
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup_and_test.replace("pip install -e", "pip install -q -e") in ci


def test_every_job_module_the_readme_names_exists():
    named = set(re.findall(r"\bjobs\.([a-z_]\w*)\b", README))
    assert {"demo", "score", "train", "evaluate"} <= named
    missing = sorted(job for job in named if importlib.util.find_spec(f"jobs.{job}") is None)
    assert not missing, f"README names job modules that do not exist: {missing}"


def test_every_file_the_readme_runs_exists():
    paths = set(re.findall(r"\b((?:jobs/configs|benchmarks)/[\w/.-]+\.(?:yaml|py|md))\b", README))
    assert any(p.startswith("jobs/configs/") for p in paths) and any(p.startswith("benchmarks/") for p in paths)
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, f"README refers to files that do not exist: {missing}"


def test_readme_job_commands_use_real_keys_and_validate():
    commands = job_commands()
    assert {job for job, _ in commands} >= {"score", "train", "evaluate", "demo"}
    for job, tokens in commands:
        config_path, overrides = split_arguments(tokens)
        if not (config_path or overrides):
            continue
        cls = config_class(job)
        fields = set(cls.model_fields)
        unknown = [o for o in overrides if o.split("=", 1)[0].split(".")[0] not in fields]
        assert not unknown, f"README: python -m jobs.{job} {' '.join(tokens)}: not keys of {cls.__name__}: {unknown}"
        load_config(cls, ROOT / config_path if config_path else None, overrides)


def scoring_key_table() -> list[str]:
    """The keys (first column) of the ``| key | default | meaning |`` table under '## Scoring job'."""
    section = README.split("\n## Scoring job\n", 1)[1].split("\n## ", 1)[0]
    table = re.search(r"^\| key \| default \| meaning \|\n\|[-| ]+\|\n((?:\|.*\|\n)+)", section, re.M)
    assert table, "no '| key | default | meaning |' table under '## Scoring job'"
    keys = []
    for row in table[1].splitlines():
        cell = re.fullmatch(r"`(\w+)`", row.split("|")[1].strip())
        assert cell, f"scoring key table: first cell is not a `key`: {row!r}"
        keys.append(cell[1])
    return keys


def test_the_scoring_key_table_lists_exactly_the_score_config_keys():
    # Fails while pipelines/score/config.py gains or loses keys until README.md's table follows:
    # the table must then be updated, not this test.
    keys = scoring_key_table()
    fields = list(config_class("score").model_fields)
    assert len(keys) == len(set(keys)), f"keys listed twice: {sorted(k for k in set(keys) if keys.count(k) > 1)}"
    assert not set(keys) - set(fields), f"README table lists keys ScoreConfig lacks: {sorted(set(keys) - set(fields))}"
    assert not set(fields) - set(keys), f"README table lacks ScoreConfig keys: {sorted(set(fields) - set(keys))}"


def test_library_example_runs(capsys):
    example = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    columns = namespace["columns"]
    heads = {head["name"]: head for head in namespace["heads"]}
    printed = ("type_label", "tags_labels", "topic_economy_label", "sphere_set")
    assert capsys.readouterr().out == " ".join(str(columns[c]) for c in printed) + "\n"
    assert len(columns["type_label"]) == 2  # one prediction per text
    assert set(columns["type_label"]) <= set(heads["type"]["labels"])
    assert all(set(tags) <= set(heads["tags"]["labels"]) for tags in columns["tags_labels"])
    assert set(columns["topic_economy_label"]) <= set(heads["topic"]["labels"])
    assert all(chosen and set(chosen) <= set(heads["sphere"]["labels"]) for chosen in columns["sphere_set"])


def layout_section() -> str:
    start = README.index("Layout (imports point one way")
    return README[start:README.index("\n## ", start)]


def test_the_layout_names_every_shared_module_and_only_files_that_exist():
    layout = layout_section()
    named = set(re.findall(r"`([\w/]+\.py)`", layout))
    for folder in ("pipelines", "pipelines/sink", "deploy"):
        for path in sorted((ROOT / folder).glob("*.py")):
            if path.name != "__init__.py":
                assert path.name in named or f"{folder}/{path.name}" in named, f"README layout does not name {folder}/{path.name}"
    sources = {p.name for folder in ("mtcls", "pipelines", "jobs", "deploy", "benchmarks") for p in (ROOT / folder).rglob("*.py")}
    for name in named:  # every file it names is in the tree
        assert Path(name).name in sources or (ROOT / name).exists(), name
    for folder in re.findall(r"`([\w]+(?:/[\w]+)*)/`", layout):
        assert (ROOT / folder).is_dir() or (ROOT / "pipelines" / folder).is_dir() or (ROOT / "mtcls" / folder).is_dir(), folder
