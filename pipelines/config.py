"""Typed job configs: pydantic models filled from YAML and ``key=value`` overrides, validated up front.

A job's config is a :class:`JobConfig` (a pydantic model: ``extra="forbid"``, strict types,
``Literal`` choices, ``Field`` bounds, validators for the checks that span keys). :func:`load_config`
reads the YAML file (if any), merges the command-line overrides into it (``key=value``,
``a.b=value``; values parsed as YAML, so ``batch_size=32`` is an int and
``text_columns=[title,abstract]`` a list) and validates the result. Every failure becomes one
:class:`ConfigError` line naming the key (a dotted path such as ``heads[1].kind`` inside lists and
sections), the bad value and what was expected, with the closest known key for an unknown one.
Building a config in code (``ScoreConfig(input=...)``) raises the same error. Nothing starts before
the config is valid.

A shipped YAML can mark a key the user must give on the command line with the value ``???``
(:data:`REQUIRED`), e.g. ``model: ???`` in a config that scores real data.

The model is also its own documentation: every field's ``description`` is its meaning (Markdown:
backticks, and ``[text](#anchor)`` links into the README). :func:`describe_config` lists the keys
with type, default and meaning, :func:`format_config_help` turns that into a job's ``--help``, and
``python -m pipelines.config_docs`` writes the README's key tables from it.
"""

from __future__ import annotations

import collections.abc
import difflib
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Sequence, Type, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from typing_extensions import is_typeddict

T = TypeVar("T", bound="JobConfig")

REQUIRED = "???"
"""A YAML value meaning "this key must be set on the command line"."""

InferencePrecision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
"""The ``precision`` of an inference job (``mtcls.PRECISIONS``)."""

TrainPrecision = Literal["auto", "fp32", "bf16", "fp16"]
"""The ``precision`` of training: every inference precision but ``int8``."""


class ConfigError(ValueError):
    """A config is invalid; the message names the key."""


class JobConfig(BaseModel):
    """Base of every job config (and of a config's sections).

    Types are strict, as YAML gives them: ``true`` is no int, ``1`` no bool, ``"32"`` no int. Two
    exceptions keep YAML's quirks harmless: a float key also takes a numeric string (YAML 1.1 reads
    ``1e-4`` without a dot as one), and a list key also takes a tuple. Unknown keys are errors.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    def __init__(self, **data: Any) -> None:
        """Validates ``data`` like :func:`load_config` does.

        Raises:
            ConfigError: Naming the key, as :func:`load_config` does.
        """
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(validation_message(type(self), exc, data)) from None

    # Pydantic calls a model's own __init__ to validate it as a nested section unless the __init__ is
    # marked as its base one; nested errors must reach the outer config with their full key path.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @model_validator(mode="before")
    @classmethod
    def _yaml_leniency(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fixed = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if field is None:
                continue
            tp = _strip(field.annotation)
            if tp is float and isinstance(value, str):
                try:
                    fixed[name] = float(value)
                except ValueError:
                    pass
            elif typing.get_origin(tp) is list and isinstance(value, tuple):
                fixed[name] = list(value)
        return fixed


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


def _required_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys (dotted for sections) whose value is still the :data:`REQUIRED` marker."""
    found = []
    for key, value in data.items():
        if isinstance(value, dict):
            found += _required_keys(value, f"{prefix}{key}.")
        elif value == REQUIRED:
            found.append(prefix + key)
    return found


def load_config(cls: Type[T], path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> T:
    """Builds and validates a job config.

    Args:
        cls: The config model (a :class:`JobConfig`).
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
    return validate_config(cls, data)


def validate_config(cls: Type[T], data: dict[str, Any]) -> T:
    """Validates plain data (a merged YAML mapping, a ``config_to_dict`` result) as a ``cls``.

    Raises:
        ConfigError: Naming the key, as :func:`load_config` does.
    """
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(cls, exc, data)) from None


def check_inference_precision(config: Any) -> None:
    """Checks that an inference job's ``precision=int8`` can run here, before any work.

    Raises:
        ConfigError: Naming ``precision``: int8 with GPU actors requested, or int8 without its packages.
    """
    if config.precision != "int8":
        return
    from mtcls.quantize import int8_unavailable

    if getattr(config, "num_gpus_per_actor", -1) > 0:
        raise ConfigError("key 'precision': int8 runs on CPU actors, but num_gpus_per_actor > 0; "
                          "on GPUs use precision=auto (bf16/fp16)")
    reason = int8_unavailable()
    if reason:
        raise ConfigError(f"key 'precision': int8 cannot run on this machine: {reason}")


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    """A config as plain data, for manifests and logs (:func:`validate_config` reads it back)."""
    return config.model_dump()


# ---------------------------------------------------------------- annotations


_LISTS = (list, tuple, collections.abc.Sequence)


def _strip(tp: Any) -> Any:
    """``tp`` without ``Annotated`` metadata and without a ``None`` alternative."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _is_record(tp: Any) -> bool:
    return is_typeddict(tp) or (isinstance(tp, type) and issubclass(tp, BaseModel))


def _record_fields(tp: Any) -> dict[str, Any]:
    """``{key: annotation}`` of a model or a TypedDict."""
    if is_typeddict(tp):
        return typing.get_type_hints(tp)
    return {name: field.annotation for name, field in tp.model_fields.items()}


def _annotation_at(cls: type, loc: Sequence[Union[str, int]]) -> Any:
    """The annotation of the value at ``loc`` (a pydantic error location) under ``cls``; None if unknown."""
    tp: Any = cls
    for part in loc:
        tp = _strip(tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if isinstance(part, int) and origin in _LISTS:
            tp = args[0] if args else Any
        elif origin is dict:
            tp = args[1] if args else Any
        elif _is_record(tp) and part in _record_fields(tp):
            tp = _record_fields(tp)[part]
        else:
            return None
    return tp


def _field_at(cls: type, loc: Sequence[Union[str, int]]) -> Any:
    """The pydantic ``FieldInfo`` of the model field at ``loc``, if ``loc`` names one."""
    if not loc or not isinstance(loc[-1], str):
        return None
    parent = _strip(_annotation_at(cls, loc[:-1]))
    if isinstance(parent, type) and issubclass(parent, BaseModel):
        return parent.model_fields.get(loc[-1])
    return None


def type_name(tp: Any) -> str:
    """An annotation as ``--help`` shows it: ``int``, ``list[str]``, ``bool | null``, ``auto | fp32``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(format_value(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin in _LISTS or origin is dict:
        name = "dict" if origin is dict else "list"
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _bounds(field: Any) -> str:
    """A field's ``Field(ge=..., lt=...)`` bounds as text: ``>= 1``, ``in (0, 1)``; empty without bounds."""
    low = high = None
    for item in getattr(field, "metadata", ()):
        for attr, op in (("gt", ">"), ("ge", ">=")):
            if getattr(item, attr, None) is not None:
                low = (op, getattr(item, attr))
        for attr, op in (("lt", "<"), ("le", "<=")):
            if getattr(item, attr, None) is not None:
                high = (op, getattr(item, attr))
    if low and high:
        return f"in {'(' if low[0] == '>' else '['}{low[1]}, {high[1]}{')' if high[0] == '<' else ']'}"
    bound = low or high
    return f"{bound[0]} {bound[1]}" if bound else ""


# ---------------------------------------------------------------- error messages

_TYPE_ERRORS = {
    "int_type", "int_parsing", "int_from_float", "float_type", "float_parsing", "bool_type", "bool_parsing",
    "string_type", "list_type", "tuple_type", "set_type", "dict_type", "model_type", "model_attributes_type",
    "is_instance_of", "none_required",
}
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _path(loc: Sequence[Union[str, int]]) -> str:
    """A pydantic error location as a key: ``('heads', 1, 'kind')`` -> ``heads[1].kind``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _given(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _lookup(data: Any, loc: Sequence[Union[str, int]]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _unknown_message(cls: type, parent: tuple, unknown: list[str], data: Any) -> str:
    """Names the unknown keys under ``parent``, the closest known key for each one that has a near match, and all known keys."""
    record = _strip(_annotation_at(cls, parent))
    known = sorted(_record_fields(record)) if _is_record(record) else []
    matches = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
    if parent and isinstance(parent[-1], int):
        # An entry of a list (a head spec): its keys are fields of that entry.
        prefix, noun = "", "field"
        name = _lookup(data, (*parent, "name"))
        lead = f"key {_path(parent)!r}" + (f" ({name!r})" if isinstance(name, str) else "") + ": "
    else:
        prefix, noun, lead = (_path(parent) + "." if parent else ""), "key", ""
    guesses = [(prefix + key, prefix + found[0]) for key, found in matches.items() if found]
    hint = "; "
    if len(unknown) == 1 and guesses:
        hint = f"; did you mean {guesses[0][1]!r}? "
    elif guesses:
        hint = "; did you mean " + ", ".join(f"{good!r} for {bad!r}" for bad, good in guesses) + "? "
    return f"{lead}unknown {noun}(s) {[prefix + k for k in unknown]}{hint}known {noun}s: {[prefix + k for k in known]}"


def _error_line(cls: type, error: dict[str, Any]) -> str:
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    key = f"key {_path(loc)!r}: " if loc else ""
    if kind in ("value_error", "assertion_error"):
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):
            return str(cause)
        return key + str(cause if cause is not None else error["msg"])
    if kind == "literal_error":
        allowed = typing.get_args(_strip(_annotation_at(cls, loc)))
        if allowed:
            return f"{key}expected one of {list(allowed)}, got {value!r}"
    if kind in _TYPE_ERRORS:
        tp = _strip(_annotation_at(cls, loc))
        origin = typing.get_origin(tp)
        if _is_record(tp) or tp is dict or origin is dict:
            expected = "a mapping"
        elif tp is list or origin in _LISTS:
            expected = "a list"
        else:
            expected = type_name(_annotation_at(cls, loc)) if tp is not None else error["msg"].replace("Input should be ", "")
        return f"{key}expected {expected}, got {_given(value)}"
    if kind in _BOUND_ERRORS:
        bounds = _bounds(_field_at(cls, loc))
        if not bounds:
            op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
            bounds = f"{op} {next(iter((error.get('ctx') or {}).values()), '?')}"
        return f"{key}must be {bounds}, got {value!r}"
    message = error["msg"]
    if message.startswith("Input should be "):
        return f"{key}expected {message[len('Input should be '):]}, got {_given(value)}"
    return key + message


def validation_message(cls: type, exc: ValidationError, data: Any = None) -> str:
    """One line for a pydantic ``ValidationError`` of ``cls``: every problem, each naming its key.

    Unknown keys come first, grouped by where they are, each with the closest known key; then
    missing keys; then wrong values: the key, what was expected and the value given.

    Args:
        cls: The config model that was validated.
        exc: Its validation error.
        data: The data that was validated (names the entry of a list in an unknown-field message).

    Returns:
        The message, problems separated by ``"; "``.
    """
    errors = exc.errors()
    unknown: dict[tuple, list[str]] = {}
    missing: list[str] = []
    lines: list[str] = []
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden" and loc:
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
        elif error["type"] == "missing":
            missing.append(_path(loc))
        else:
            line = _error_line(cls, error)
            if line not in lines:
                lines.append(line)
    out = [_unknown_message(cls, parent, sorted(keys), data) for parent, keys in unknown.items()]
    if missing:
        out.append(f"missing required key(s) {missing}")
    return "; ".join(out + lines)


# ---------------------------------------------------------------- documentation


class KeyDoc(NamedTuple):
    """One key of a config model, as ``--help`` and the README show it."""

    name: str
    type: str
    default: str
    meaning: str


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


def describe_config(cls: type[BaseModel]) -> list[KeyDoc]:
    """Every key of a config model: name, type (with its bounds), default and meaning, from the model itself.

    Args:
        cls: A config model whose fields have a ``description``.

    Returns:
        One :class:`KeyDoc` per field, in field order; ``meaning`` (the description, Markdown) is
        empty for a field without one.
    """
    keys = []
    for name, field in cls.model_fields.items():
        shown = type_name(field.annotation)
        bounds = _bounds(field)
        default = "required" if field.is_required() else format_value(field.get_default(call_default_factory=True))
        keys.append(KeyDoc(name, f"{shown} {bounds}" if bounds else shown, default, field.description or ""))
    return keys


_LINK = re.compile(r"\[([^\]]+)\]\(#[^)]*\)")


def plain_meaning(meaning: str) -> str:
    """A Markdown meaning as plain text: a README link ``[Precision](#precision)`` reads ``"Precision" in the README``."""
    return _LINK.sub(r'"\1" in the README', meaning)


def format_config_help(cls: type[BaseModel], width: int = 100) -> str:
    """The key list of a job's ``--help``: ``name: type = default`` and the meaning below it.

    Args:
        cls: The job's config model.
        width: Line width the meanings are wrapped to.

    Returns:
        Plain text, for an argparse epilog with ``RawDescriptionHelpFormatter``.
    """
    lines = [f"keys of {cls.__name__} (in the --config YAML, or key=value / a.b=value; values are YAML):"]
    for key in describe_config(cls):
        lines.append(f"  {key.name}: {key.type} = {key.default}")
        lines.append(textwrap.fill(plain_meaning(key.meaning) or "(undocumented)", width=width, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6, break_long_words=False, break_on_hyphens=False))
    return "\n".join(lines)


def check_max_length(max_length: int, limit: Optional[int], explicit: bool) -> None:
    """Refuses a token limit beyond the encoder's position embeddings, before any work.

    Args:
        max_length: The token limit the job would use.
        limit: The encoder's (:func:`mtcls.configuration.position_limit`); None: no limit.
        explicit: Whether ``max_length`` was given, or is the model's ``max_seq_length`` (key 0).

    Raises:
        ConfigError: Naming the key ``max_length``, the value and the limit.
    """
    if limit is not None and max_length > limit:
        key = "max_length" if explicit else "max_length (0: the model's max_seq_length)"
        raise ConfigError(f"key '{key}': {max_length} tokens is more than the encoder's position embeddings allow ({limit})")
