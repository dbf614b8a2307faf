"""Test doubles, kept out of the installed package: ``tests/conftest.py`` registers them.

- :class:`ScriptedBackend`: a generation backend answering from a function of the request.
- the backend ``scripted`` (:func:`scripted_backend`): ``"scripted:arithmetic"`` in a model spec is the arithmetic
  stand-in of ``scripts/arithmetic_standin.py``, in process.
"""

from __future__ import annotations

from .scripted import SCRIPTED_MODELS, ScriptedBackend, arithmetic_teacher, scripted_backend

__all__ = ["SCRIPTED_MODELS", "ScriptedBackend", "arithmetic_teacher", "register_doubles", "scripted_backend"]


def register_doubles() -> None:
    """Registers the doubles as generation backends (idempotent)."""
    from swift_callbacks.generation import register_backend

    register_backend("scripted", scripted_backend)
