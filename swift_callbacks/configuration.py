"""The one configuration kernel: YAML reading, ``--set`` overrides, and checking plain data against dataclasses.

Every config of the package (training recipes, the ScaleQuest pipeline, engine options, model specs) is read with
:func:`load_yaml` / :func:`read_yaml`, overridden with :func:`apply_override` (``training.learning_rate=2e-5``,
``data.train[0].weight=0.5``) and turned into dataclasses with :func:`build`, field by field. Every problem is a
:class:`ConfigError` whose message starts with the dotted path of the key (``influence.engine.rout: unknown key;
did you mean 'route'?``). Only the types the configs use are understood (``bool``, ``int``, ``float``, ``str``,
``list[...]``, ``dict[str, ...]``, unions, ``Literal``, enums and nested dataclasses); anything else is accepted as
given and left for the consumer to check. Local paths are checked when the config is loaded
(:func:`resolve_local`), not when a stage hours later opens them.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

MISSING = dataclasses.MISSING
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


class ConfigError(UserError):
    """An invalid config, override or spec; the message starts with the key path of the problem."""


# ---------------------------------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(text: str) -> Any:
    """Parse YAML text with the configs' number rules (``1e-5`` is a float)."""
    return yaml.load(text, Loader=_Loader)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what is wrong and where (``line 3, column 7``)."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(err, "problem", None) or str(err).splitlines()[0])


def load_yaml(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A YAML config file as a mapping, with ``overrides`` applied.

    Raises:
        ConfigError: The file cannot be read, is not YAML, is not a mapping, or an override is malformed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({err.strerror or err})") from err
    try:
        data = read_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}") from err
    data = {} if data is None else data
    for override in overrides:
        data = apply_override(data, override)
    require_mapping(data, "")
    return data


def apply_override(data: Any, override: str) -> Any:
    """Set ``dotted.key=value`` in ``data`` (mappings created on the way; ``[i]`` or ``.i`` indexes a list, and
    the index one past the end appends). The value is read as YAML.

    Raises:
        ConfigError: Malformed override, or a path through a value that is not a mapping or list.
    """
    key, sep, raw = override.partition("=")
    parts = re.findall(r"[^.\[\]]+", key.strip())
    if not sep or not parts or re.search(r"\.\.|\[\]|^\.|\.$", key.strip()):
        raise ConfigError(f"--set {override!r}: expected KEY.PATH=VALUE, e.g. training.learning_rate=2e-5")
    try:
        value = read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {override!r}: the value is not valid YAML ({_yaml_problem(err)})") from err
    root = {} if data is None else data
    node, where = root, ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(f"--set {override!r}: {where}: index {part!r} is not in 0..{len(node)}")
            index = int(part)
            if index == len(node):
                node.append(None)
            key_at: Any = index
        elif isinstance(node, dict):
            key_at = part
        else:
            raise ConfigError(f"--set {override!r}: {where} is {describe(node)}, not a mapping or list")
        if last:
            node[key_at] = value
        else:
            if (node[key_at] if isinstance(node, list) else node.get(key_at)) is None:
                node[key_at] = {}
            node = node[key_at]
        where = join(where, key_at)
    return root


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_override_argument(parser: Any, example: str, what: str = "a config value") -> None:
    """The one ``--set KEY.PATH=VALUE`` option of every command (read with :func:`apply_override`; ``dest``:
    ``overrides``)."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override {what}, e.g. --set {example} (VALUE is YAML; [i] indexes a list; repeatable)",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- values, paths


def parse_bytes(value: int | str, path: str) -> int:
    """``2147483648``, ``"2GiB"``, ``"500 MB"`` -> bytes.

    Raises:
        ConfigError: Not a positive size.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").lower()])
    else:
        raise ConfigError(f"{path}: expected a byte count or a size like '2GiB', got {describe(value)}")
    if size < 1:
        raise ConfigError(f"{path}: must be at least 1 byte, got {value!r}")
    return size


def resolve_local(value: str, base_dir: str | os.PathLike, where: str, *, must_exist: bool = True) -> Path:
    """The absolute path of a local file or folder named in a config.

    A relative path is looked up in ``base_dir`` (the config file's folder) first and the working directory
    second.

    Raises:
        ConfigError: ``must_exist`` and the path exists in neither place (the message names both).
    """
    expanded = Path(value).expanduser()
    candidates = [expanded] if expanded.is_absolute() else [Path(base_dir) / expanded, Path.cwd() / expanded]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    if must_exist:
        places = " or ".join(str(c) for c in dict.fromkeys(candidates))
        raise ConfigError(f"{where}: file {value!r} not found (looked for {places})")
    return candidates[0].resolve()


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
            value = data[f.name]
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
                # A partial section keeps the field's own defaults (a stage's sampling), not the class's.
                value = {**{g.name: getattr(default, g.name) for g in dataclasses.fields(default) if g.init}, **value}
            values[f.name] = check_type(value, hints[f.name], where)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{where}: required key is missing")
    try:
        obj = cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a value the dataclass itself refuses (its __post_init__)
        raise ConfigError(f"{path or 'config'}: {err}") from None
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
        return value if isinstance(value, hint) else build(hint, value, path)
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
