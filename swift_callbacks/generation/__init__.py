"""LLM generation backends behind one interface, with a persistent cache.

Importing this package is cheap and never imports torch, transformers, openai or vLLM: the backends are loaded
on first use (``from swift_callbacks.generation import TransformersBackend`` imports only that module, and it
imports torch only when a backend is built).

Example::

    from swift_callbacks.generation import GenerationRequest, Generator, OpenAICompatibleBackend

    backend = OpenAICompatibleBackend("http://127.0.0.1:8000/v1", "Qwen/Qwen3-8B")
    results = Generator(backend, ".swift_cache/generation").run(
        [GenerationRequest.chat("q1", [{"role": "user", "content": "What is 2 + 2?"}])]
    )

Backends from outside the package (users' plugins, in-house servers, test doubles) are added by name with
:func:`register_backend` (or an entry point of group ``swift_callbacks.backends``); model specs that name them
are resolved through :func:`get_backend`. See :mod:`swift_callbacks.generation.registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from .base import Backend, GenerationRequest, GenerationResult, SamplingParams
from .cache import GenerationCache
from .registry import (
    UnknownBackendError,
    get_backend,
    is_registered,
    make_backend,
    register_backend,
    registered_backends,
    unregister_backend,
)
from .runner import Generator, RunStats

# Loaded on first access: each pulls in a heavy or optional dependency (openai, torch/transformers, vllm).
_LAZY = {
    "OpenAICompatibleBackend": "openai_backend",
    "TransformersBackend": "transformers_backend",
    "VLLMBackend": "vllm_backend",
    "BackendConfigError": "factory",
    "add_backend_arguments": "factory",
    "backend_from_args": "factory",
    "sampling_from_args": "factory",
}

__all__ = [
    "Backend",
    "BackendConfigError",
    "GenerationCache",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "OpenAICompatibleBackend",
    "RunStats",
    "SamplingParams",
    "TransformersBackend",
    "UnknownBackendError",
    "VLLMBackend",
    "add_backend_arguments",
    "backend_from_args",
    "get_backend",
    "is_registered",
    "make_backend",
    "register_backend",
    "registered_backends",
    "sampling_from_args",
    "unregister_backend",
]

if TYPE_CHECKING:
    from .factory import BackendConfigError, add_backend_arguments, backend_from_args, sampling_from_args
    from .openai_backend import OpenAICompatibleBackend
    from .transformers_backend import TransformersBackend
    from .vllm_backend import VLLMBackend


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
