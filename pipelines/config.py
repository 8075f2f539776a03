"""Typed job configs: a dataclass filled from YAML and ``key=value`` overrides, validated up front.

A job's config is a dataclass whose fields carry type annotations. :func:`load_config` reads the
YAML file (if any), applies command-line overrides (``key=value``, ``a.b=value``; values parsed as
YAML, so ``batch_size=32`` is an int and ``text_columns=[title,abstract]`` a list), rejects unknown
keys by name, checks every value's type, and finally runs the dataclass's ``__post_init__`` checks.
Nothing starts before the config is valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence, Type, TypeVar, Union

import yaml

T = TypeVar("T")


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


def _build(cls: Type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[prefix + k for k in unknown]}; known keys: {[prefix + k for k in sorted(fields)]}"
        )
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
        ConfigError: On a missing file, bad YAML, an unknown key, a wrong type or a failed check;
            the message names the key.
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
    return _build(cls, data)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as plain data, for manifests and logs."""
    return dataclasses.asdict(config)
