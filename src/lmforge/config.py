"""Typed configs: dataclasses filled from YAML files and `--dotted.key=value` overrides.

Every recipe in `configs/` is a YAML mapping whose keys are the fields of a dataclass
(nested dataclasses are nested mappings). Unknown keys and wrong types are errors that
name the full dotted key, so a typo in a 200-line recipe is found before training starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigKeyError(ValueError):
    """A config key that does not exist, or a value of the wrong type; names the dotted key."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigKeyError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigKeyError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigKeyError(f"config file {path} must hold a mapping at the top level, got {kind}")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['model.d_model=256', '--train.lr', '3e-4'] -> nested dict; values parsed as YAML scalars."""
    result: dict[str, Any] = {}
    pending_key: str | None = None
    for item in items:
        if pending_key is not None:
            _set_dotted(result, pending_key, _parse_value(item))
            pending_key = None
            continue
        text = item[2:] if item.startswith("--") else item
        if "=" in text:
            key, value = text.split("=", 1)
            _set_dotted(result, key, _parse_value(value))
        elif item.startswith("--"):
            pending_key = text
        else:
            raise ConfigKeyError(f"override {item!r} must look like key.path=value")
    if pending_key is not None:
        raise ConfigKeyError(f"override --{pending_key} has no value")
    return result


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.replace("-", "_").split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigKeyError(f"override {dotted!r} conflicts with a value set for {part!r}")
    target[parts[-1]] = value


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build(cls: type[T], values: dict[str, Any], *, prefix: str = "") -> T:
    """Instantiate dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(values, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigKeyError(f"{where} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = [name for name in fields if name.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigKeyError(f"unknown config key {dotted!r}{hint}; known: {', '.join(fields)}")
        kwargs[key] = _coerce(hints[key], _over_default(fields[key], value), dotted)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigKeyError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err


def _over_default(field: dataclasses.Field, value: Any) -> Any:
    """A partial mapping for a nested section laid over that section's own default: a recipe class
    whose `optim` defaults to lr 5e-6 keeps it when only `optim.weight_decay` is given."""
    factory = field.default_factory
    if not isinstance(value, dict) or factory is dataclasses.MISSING:
        return value
    default = factory()
    if not dataclasses.is_dataclass(default):
        return value
    return _laid_over(default, value)


def _laid_over(default: Any, over: dict[str, Any]) -> dict[str, Any]:
    """The dataclass instance `default` as a mapping of its fields, with `over` laid on top (recursively)."""
    merged = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
    for key, value in over.items():
        inner = merged.get(key)
        nested = isinstance(value, dict) and dataclasses.is_dataclass(inner)
        merged[key] = _laid_over(inner, value) if nested else value
    return merged


def _coerce(hint: Any, value: Any, dotted: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, dotted)
            except ConfigKeyError as err:
                errors.append(str(err))
        message = errors[0] if len(errors) == 1 else f"{dotted}: {value!r} fits none of {hint}"
        raise ConfigKeyError(message)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigKeyError(f"{dotted} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):  # a section's default, kept whole under a partial override
            return value
        return build(hint, value, prefix=f"{dotted}.")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigKeyError(f"{dotted} must be a list, got {value!r}")
        item = args[0] if args else Any
        return origin(_coerce(item, v, f"{dotted}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigKeyError(f"{dotted} must be a mapping, got {value!r}")
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads 3e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    is_bool_for_int = hint is int and isinstance(value, bool)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not is_bool_for_int):
        raise ConfigKeyError(f"{dotted} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """The one entry point: YAML file (optional) + dotted overrides -> typed config."""
    values = load_yaml(path) if path else {}
    values = merge(values, parse_overrides(overrides or []))
    return build(cls, values)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
