"""Stage settings as dataclasses, and strict reading of them from YAML data with errors that name the key path.

Every stage has a settings dataclass whose defaults are the paper's settings. :func:`build_settings` reads a YAML
mapping into one, checking every key and value: an unknown key is an error naming its full path and the closest
known key (``stages.respond.samplng: unknown key; did you mean 'sampling'?``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...generation.base import SamplingParams
from .models import ConfigError


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one generation role (``n`` and the seed are set by the stage).

    Attributes:
        temperature: 0 is greedy.
        top_p: Nucleus sampling mass.
        max_tokens: Completion length cap.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_tokens < 1:
            raise ValueError(
                f"invalid sampling settings {self}: need temperature >= 0, 0 < top_p <= 1, max_tokens >= 1"
            )

    def params(self, n: int = 1, seed: int | None = None) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens, n=n,
                              seed=seed)  # fmt: skip


def suggest(key: str, allowed: list[str]) -> str:
    """``did you mean 'x'?`` for the closest allowed name, else the list of allowed names."""
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"expected one of {', '.join(sorted(allowed))}" if allowed else "no keys are allowed here"


def check_keys(data: Mapping[str, Any], allowed: list[str], path: str) -> None:
    """Raises for the first key of ``data`` not in ``allowed``.

    Raises:
        ConfigError: ``<path>.<key>: unknown key; did you mean ...``.
    """
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{join(path, str(key))}: unknown key; {suggest(str(key), allowed)}")


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def build_settings(cls: type, data: Mapping[str, Any] | None, path: str) -> Any:
    """Builds settings dataclass ``cls`` from YAML data, checking keys and value types.

    Args:
        cls: A settings dataclass.
        data: Its YAML mapping (None or empty: all defaults).
        path: Key path of ``data`` in the config, for messages.

    Returns:
        The settings.

    Raises:
        ConfigError: Unknown key, wrong type, or a value the dataclass refuses.
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_keys(data, list(fields), path)
    values = {name: _value(hints[name], data[name], join(path, name)) for name in fields if name in data}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from None


def _value(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build_settings(hint, value, path)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _value(option, value, path)
                except ConfigError:
                    continue
        raise ConfigError(f"{path}: expected {_name(hint)}, got {type(value).__name__} {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_value(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    return _scalar(hint, value, path)


def _scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _name(hint: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint)) or str(hint)


def settings_dict(settings: Any) -> dict[str, Any]:
    """The settings as a JSON-ready dict (for stats files and fingerprints)."""
    return dataclasses.asdict(settings)


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """``["sampling.temperature=0.5", "n=4"]`` -> ``{"sampling": {"temperature": 0.5}, "n": 4}`` (values read as
    YAML).

    Raises:
        ConfigError: An item without ``=``.
    """
    from .config import read_yaml

    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        target = result
        *parents, leaf = key.strip().split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = read_yaml(raw)
    return result
