"""Typed job configs: a dataclass filled from YAML and ``key=value`` overrides, validated up front.

A job's config is a dataclass whose fields carry type annotations. :func:`load_config` reads the
YAML file (if any), applies command-line overrides (``key=value``, ``a.b=value``; values parsed as
YAML, so ``batch_size=32`` is an int and ``text_columns=[title,abstract]`` a list), rejects unknown
keys by name (suggesting the closest known key), checks every value's type, and finally runs the
dataclass's ``__post_init__`` checks. Nothing starts before the config is valid.

A shipped YAML can mark a key the user must give on the command line with the value ``???``
(:data:`REQUIRED`), e.g. ``model: ???`` in a config that scores real data.

The config class is also its own documentation: :func:`describe_config` reads every field's type,
default and meaning (from the ``Attributes:`` section of the class docstring), and
:func:`format_config_help` turns that into the key list of a job's ``--help``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, Type, TypeVar, Union

import yaml

T = TypeVar("T")

REQUIRED = "???"
"""A YAML value meaning "this key must be set on the command line"."""


class ConfigError(ValueError):
    """A config is invalid; the message names the key."""


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is both a value and a section")
        node[parts[-1]] = value
    return out


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Checks ``value`` against the annotation ``tp`` (and nested dataclasses), converting ints to floats."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"key {key!r}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"key {key!r}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"key {key!r}: expected {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"key {key!r}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _unknown_keys_message(unknown: Sequence[str], known: Sequence[str], prefix: str) -> str:
    """Names the unknown keys, the closest known key for each one that has a near match, and all known keys."""
    matches = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
    guesses = [(prefix + key, prefix + found[0]) for key, found in matches.items() if found]
    hint = "; "
    if len(unknown) == 1 and guesses:
        hint = f"; did you mean {guesses[0][1]!r}? "
    elif guesses:
        hint = "; did you mean " + ", ".join(f"{good!r} for {bad!r}" for bad, good in guesses) + "? "
    return f"unknown key(s) {[prefix + k for k in unknown]}{hint}known keys: {[prefix + k for k in known]}"


def _required_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys (dotted for sections) whose value is still the :data:`REQUIRED` marker."""
    found = []
    for key, value in data.items():
        if isinstance(value, dict):
            found += _required_keys(value, f"{prefix}{key}.")
        elif value == REQUIRED:
            found.append(prefix + key)
    return found


def _build(cls: Type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(_unknown_keys_message(unknown, sorted(fields), prefix))
    kwargs = {name: _coerce(prefix + name, value, hints[name]) for name, value in data.items()}
    missing = [
        prefix + f.name
        for f in fields.values()
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc


def load_config(cls: Type[T], path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> T:
    """Builds and validates a job config.

    Args:
        cls: The config dataclass.
        path: A YAML file, or None for defaults only.
        overrides: ``key=value`` strings applied on top of the file.

    Returns:
        The validated config.

    Raises:
        ConfigError: On a missing file, bad YAML, an unknown key, a key left as :data:`REQUIRED`, a
            wrong type or a failed check; the message names the key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    data = _deep_merge(data, _parse_overrides(overrides))
    required = _required_keys(data)
    if required:
        example = " ".join(f"{key}=..." for key in required)
        raise ConfigError(f"key(s) {required} must be given on the command line "
                          f"(the config file leaves them as {REQUIRED!r}), e.g. {example}")
    return _build(cls, data)


def require_at_least(config: Any, minimum: int, *keys: str) -> None:
    """Checks that each named key of a config is at least ``minimum``.

    Raises:
        ConfigError: Naming the first key below it, with its value.
    """
    for key in keys:
        if getattr(config, key) < minimum:
            raise ConfigError(f"key {key!r}: must be >= {minimum}, got {getattr(config, key)}")


def check_inference_precision(config: Any) -> None:
    """Validates an inference job's ``precision`` key, and that int8 can run here, before any work.

    Raises:
        ConfigError: Naming ``precision``: an unknown value, int8 with GPU actors requested, or
            int8 without its packages.
    """
    from mtcls import PRECISIONS
    from mtcls.quantize import int8_unavailable

    if config.precision not in PRECISIONS:
        raise ConfigError(f"key 'precision': expected one of {list(PRECISIONS)}, got {config.precision!r}")
    if config.precision != "int8":
        return
    if getattr(config, "num_gpus_per_actor", -1) > 0:
        raise ConfigError("key 'precision': int8 runs on CPU actors, but num_gpus_per_actor > 0; "
                          "on GPUs use precision=auto (bf16/fp16)")
    reason = int8_unavailable()
    if reason:
        raise ConfigError(f"key 'precision': int8 cannot run on this machine: {reason}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as plain data, for manifests and logs."""
    return dataclasses.asdict(config)


class KeyDoc(NamedTuple):
    """One key of a config class, as ``--help`` shows it."""

    name: str
    type: str
    default: str
    meaning: str


_ENTRY = re.compile(r"(?P<names>[A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*(?:\([^()]*\))?\s*:\s*(?P<text>.*)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def docstring_attributes(doc: Optional[str]) -> dict[str, str]:
    """The entries of the ``Attributes:`` section of a Google-style docstring.

    An entry is ``name: meaning`` (or ``name (type): meaning``) at the section's entry indent, with
    continuation lines indented further; ``a, b, c: meaning`` documents several names at once. The
    section ends at the first non-blank line indented no deeper than ``Attributes:``.

    Args:
        doc: A docstring, e.g. ``cls.__doc__``.

    Returns:
        ``{name: meaning}`` in docstring order, each meaning on one line; ``{}`` without the section.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if start is None:
        return {}
    section_indent, entry_indent = _indent(lines[start]), None
    entries: list[tuple[list[str], list[str]]] = []
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = _indent(line)
        if indent <= section_indent or (entry_indent is not None and indent < entry_indent):
            break
        entry_indent = entry_indent if entry_indent is not None else indent
        match = _ENTRY.fullmatch(line.strip()) if indent == entry_indent else None
        if match:
            entries.append(([n.strip() for n in match["names"].split(",")], [match["text"]]))
        elif entries:
            entries[-1][1].append(line.strip())
    return {name: " ".join(" ".join(text).split()) for names, text in entries for name in names}


def format_value(value: Any) -> str:
    """A value as it would be written after ``key=`` (YAML flow style): ``true``, ``""``, ``[a, b]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _field_type(field: dataclasses.Field, hints: dict[str, Any]) -> str:
    if isinstance(field.type, str):  # the annotation as written (``from __future__ import annotations``)
        return field.type
    tp = hints.get(field.name, field.type)
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _field_default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return format_value(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return format_value(field.default_factory())
    return "required"


def describe_config(cls: type) -> list[KeyDoc]:
    """Every key of a config dataclass: name, type, default and meaning, read from the class itself.

    Args:
        cls: A config dataclass whose docstring has an ``Attributes:`` section.

    Returns:
        One :class:`KeyDoc` per init field, in field order; ``meaning`` is empty for a field the
        docstring does not document.
    """
    hints = typing.get_type_hints(cls)
    meanings = docstring_attributes(cls.__doc__)
    return [
        KeyDoc(f.name, _field_type(f, hints), _field_default(f), meanings.get(f.name, ""))
        for f in dataclasses.fields(cls)
        if f.init
    ]


def format_config_help(cls: type, width: int = 100) -> str:
    """The key list of a job's ``--help``: ``name: type = default`` and the meaning below it.

    Args:
        cls: The job's config dataclass.
        width: Line width the meanings are wrapped to.

    Returns:
        Plain text, for an argparse epilog with ``RawDescriptionHelpFormatter``.
    """
    lines = [f"keys of {cls.__name__} (in the --config YAML, or key=value / a.b=value; values are YAML):"]
    for key in describe_config(cls):
        lines.append(f"  {key.name}: {key.type} = {key.default}")
        lines.append(textwrap.fill(key.meaning or "(undocumented)", width=width, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6, break_long_words=False, break_on_hyphens=False))
    return "\n".join(lines)
