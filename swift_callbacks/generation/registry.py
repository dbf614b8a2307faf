"""Backends added by name from outside the package: users' plugins, test doubles, in-house servers.

A registered backend is a *factory*: a callable taking the model name (and, from a mapping spec, the keyword
arguments in its ``options``) and returning an object that implements
:class:`~swift_callbacks.generation.Backend` (``name``, ``model``, ``generate``; optionally
``supports_completion``). Every place that reads a model spec by backend name resolves the name through
:func:`get_backend` (ScaleQuest's ``ModelSpec``: the string ``"NAME:MODEL"`` or the mapping
``{backend: NAME, model: MODEL, options: {...}}``).

Register in code::

    from swift_callbacks.generation import register_backend

    def make_echo(model: str, **options) -> EchoBackend:  # EchoBackend implements the Backend protocol
        return EchoBackend(model, **options)

    register_backend("echo", make_echo)  # now "echo:v1" is a model spec

or, so that the command line finds it without any import, declare an entry point of group
``swift_callbacks.backends`` in the plugin's own package (``pyproject.toml``)::

    [project.entry-points."swift_callbacks.backends"]
    echo = "my_plugin.backends:make_echo"

An entry point is loaded the first time its name is looked up. The names of the built-in backends and spec forms
(:data:`RESERVED_NAMES`) cannot be registered. A backend used for scoring (a reward model, a difficulty scorer)
answers each request with one text, the score as a decimal number.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from ..errors import UserError

ENTRY_POINT_GROUP = "swift_callbacks.backends"
RESERVED_NAMES = frozenset({"openai", "transformers", "vllm", "tiny", "stage"})
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")

BackendFactory = Callable[..., Any]
_FACTORIES: dict[str, BackendFactory] = {}


class UnknownBackendError(UserError):
    """No backend is registered (or declared as an entry point) under the name asked for."""


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Makes ``factory`` the backend called ``name``.

    Args:
        name: A letter, then letters, digits, ``_``, ``.`` or ``-`` (no ``:``: it ends a spec's backend part).
        factory: ``factory(model, **options)`` returning a backend.
        replace: Allow replacing a backend already registered under ``name``.

    Raises:
        ValueError: A malformed or reserved name, a factory that is not callable, or a name already registered
            (without ``replace``).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"backend name must match {_NAME.pattern}, got {name!r}")
    if name in RESERVED_NAMES:
        raise ValueError(f"backend name {name!r} is built in; choose another name")
    if not callable(factory):
        raise ValueError(f"backend {name!r}: the factory must be callable, got {type(factory).__name__}")
    if name in _FACTORIES and not replace and _FACTORIES[name] is not factory:
        raise ValueError(f"backend {name!r} is already registered (pass replace=True to replace it)")
    _FACTORIES[name] = factory


def unregister_backend(name: str) -> None:
    """Removes the backend registered as ``name`` (nothing happens when there is none)."""
    _FACTORIES.pop(name, None)


def is_registered(name: str) -> bool:
    """Whether :func:`get_backend` finds ``name`` (registered, or declared as an entry point)."""
    return name in _FACTORIES or (name not in RESERVED_NAMES and name in _entry_point_names())


def registered_backends() -> list[str]:
    """The names :func:`get_backend` finds, sorted (entry points included, without loading them)."""
    return sorted(set(_FACTORIES) | (_entry_point_names() - RESERVED_NAMES))


def get_backend(name: str) -> BackendFactory:
    """The factory of the backend ``name``: a registered one, else an entry point of :data:`ENTRY_POINT_GROUP`.

    Raises:
        UnknownBackendError: Neither exists.
    """
    factory = _FACTORIES.get(name)
    if factory is None and name not in RESERVED_NAMES:
        for point in entry_points(group=ENTRY_POINT_GROUP):
            if point.name == name:
                factory = point.load()
                register_backend(name, factory)
                break
    if factory is None:
        known = ", ".join(registered_backends()) or "none"
        raise UnknownBackendError(f"no backend registered as {name!r} (registered: {known}); see register_backend")
    return factory


def make_backend(name: str, model: str, **options: Any) -> Any:
    """The backend ``name`` built for ``model``: ``get_backend(name)(model, **options)``.

    Raises:
        UnknownBackendError: No backend ``name``.
    """
    return get_backend(name)(model, **options)


def _entry_point_names() -> set[str]:
    return {point.name for point in entry_points(group=ENTRY_POINT_GROUP)}
