"""Checking plain YAML data against dataclasses and type hints, with errors that name the key path.

The training config is read from YAML into dicts and lists; :func:`build` turns such data into a dataclass,
field by field, and every problem is a :class:`ConfigError` whose message starts with the dotted path of the key
(``influence.engine.rout: unknown key; did you mean 'route'?``). Only the types the configs use are understood
(``bool``, ``int``, ``float``, ``str``, ``list[...]``, ``dict[str, ...]``, unions, ``Literal``, enums and nested
dataclasses); anything else is accepted as given and left for the consumer to check.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """An invalid training config; the message starts with the key path of the problem."""


def join(path: str, key: str | int) -> str:
    """The path of ``key`` below ``path`` (``a.b``, ``a[0]``)."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def check_keys(data: Mapping[str, Any], allowed: Iterable[str], path: str) -> None:
    """Raise for the first key of ``data`` not in ``allowed``, suggesting the closest allowed key.

    Raises:
        ConfigError: ``<path>.<key>: unknown key; did you mean '<closest>'?``.
    """
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{join(path, str(key))}: unknown key; {suggest(str(key), allowed)}")


def suggest(key: str, allowed: list[str]) -> str:
    """``did you mean 'x'?`` for the closest allowed name, else the list of allowed names."""
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"expected one of {', '.join(sorted(allowed))}" if allowed else "no keys are allowed here"


def require_mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {describe(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{join(path, str(key))}: keys must be strings, got {describe(key)}")
    return value


def describe(value: Any) -> str:
    """A short description of a value for error messages (``a list``, ``the string 'abc'``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def build(cls: type, data: Any, path: str) -> Any:
    """Build the dataclass ``cls`` from the mapping ``data``, checking keys, required fields and types.

    Fields whose metadata has ``{"config": False}`` are not read from ``data``. After construction, a
    ``check(path)`` method of the dataclass, if it has one, checks values that a type cannot express (ranges,
    combinations).

    Raises:
        ConfigError: Unknown key, missing required key, or a value of the wrong type.
    """
    data = require_mapping({} if data is None else data, path)
    fields = [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("config", True)]
    check_keys(data, [f.name for f in fields], path)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields:
        where = join(path, f.name)
        if f.name in data:
            values[f.name] = check_type(data[f.name], hints[f.name], where)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{where}: required key is missing")
    obj = cls(**values)
    if hasattr(obj, "check"):
        obj.check(path)
    return obj


def check_type(value: Any, hint: Any, path: str) -> Any:
    """``value`` checked against the type hint ``hint`` (nested dataclasses are built).

    Raises:
        ConfigError: If ``value`` does not match.
    """
    if hint is Any or hint is object:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _check_union(value, typing.get_args(hint), path)
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(f"{path}: expected one of {', '.join(repr(a) for a in allowed)}, got {describe(value)}")
        return value
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {describe(value)}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return [check_type(v, item, join(path, i)) for i, v in enumerate(value)]
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        mapping = require_mapping(value, path)
        args = typing.get_args(hint)
        item = args[1] if len(args) == 2 else Any
        return {k: check_type(v, item, join(path, k)) for k, v in mapping.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [m.value for m in hint]
        if value in values or isinstance(value, hint):
            return value
        raise ConfigError(f"{path}: expected one of {', '.join(repr(v) for v in values)}, got {describe(value)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {describe(value)}")
        return value
    if hint is float:
        # An int is a valid float value; it is kept as given (TrainingArguments treats e.g. save_steps=50 as a count).
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {describe(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {describe(value)}")
        return value
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {describe(value)}")
        return value
    return value  # a type this checker does not know (e.g. a config object): the consumer checks it


def _check_union(value: Any, options: tuple, path: str) -> Any:
    if value is None and type(None) in options:
        return None
    options = tuple(o for o in options if o is not type(None))
    # A value shaped like one structured option (a mapping for a dataclass or dict, a list for a list) is checked
    # against that option alone, so that a problem deep inside it is reported at its own path.
    shaped = [o for o in options if _shape(o) == _shape_of(value)]
    if shaped and _shape_of(value) != "scalar":
        return check_type(value, shaped[0], path)
    for option in options:
        try:
            return check_type(value, option, path)
        except ConfigError:
            continue
    names = ", ".join(_type_name(o) for o in options)
    raise ConfigError(f"{path}: expected {names}, got {describe(value)}")


def _shape(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (list, tuple) or hint in (list, tuple):
        return "list"
    if dataclasses.is_dataclass(hint):
        return "mapping"
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return "mapping"
    return "scalar"


def _shape_of(value: Any) -> str:
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    return "scalar"


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if hint in (bool, int, float, str):
        return {"bool": "a boolean", "int": "an integer", "float": "a number", "str": "a string"}[hint.__name__]
    origin = typing.get_origin(hint)
    if origin in (list, tuple) or hint in (list, tuple):
        return "a list"
    if origin in (dict, Mapping) or hint in (dict, Mapping) or dataclasses.is_dataclass(hint):
        return "a mapping"
    if origin is typing.Literal:
        return " / ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))
