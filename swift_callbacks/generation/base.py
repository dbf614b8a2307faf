"""The generation interface every backend implements, and the records that flow through it.

Nothing here imports torch: builders and the CLI stay fast to start.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
COMPLETION_ROLE = "prefix"


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; part of the cache key, so two settings never share a cached answer."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One request: a chat (``messages``), or a raw-text completion (``prompt``).

    A completion request continues ``prompt`` exactly as written, with no chat template and no special tokens
    added: e.g. a chat template's prefix up to the user turn, so that the model writes a user question. Every
    backend whose ``supports_completion`` is true answers both kinds (transformers: the text tokenized as is;
    vLLM: ``LLM.generate``; OpenAI-compatible servers: the ``/v1/completions`` endpoint).

    Attributes:
        key: Caller's id of the item the request belongs to (e.g. ``"<source id>/cot"``); used in records and
            rejects, not in the cache key.
        messages: The chat messages (empty for a completion request).
        params: Sampling settings.
        prompt: The raw text to continue, or None for a chat request.
    """

    key: str
    messages: tuple[tuple[str, str], ...]  # ((role, content), ...) so requests are hashable
    params: SamplingParams = SamplingParams()
    prompt: str | None = None

    @classmethod
    def chat(cls, key: str, messages: Iterable[Message], params: SamplingParams | None = None) -> GenerationRequest:
        return cls(key, tuple((m["role"], m["content"]) for m in messages), params or SamplingParams())

    @classmethod
    def completion(cls, key: str, prompt: str, params: SamplingParams | None = None) -> GenerationRequest:
        """A request to continue the raw text ``prompt`` (see the class docstring)."""
        return cls(key, (), params or SamplingParams(), prompt)

    @property
    def is_completion(self) -> bool:
        return self.prompt is not None

    def message_dicts(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def cache_key(self, backend: str, model: str) -> str:
        """Stable hash of everything that determines the answer: backend, model, messages, sampling.

        Sampling numbers are normalized first (``temperature=1`` and ``temperature=1.0`` are one setting).
        """
        params = asdict(self.params)
        for name in ("temperature", "top_p"):
            params[name] = float(params[name])
        for name in ("max_tokens", "n", "seed"):
            if params[name] is not None:
                params[name] = int(params[name])
        # A completion is keyed as a one-message conversation of role "prefix" (the keys of earlier caches).
        messages = ((COMPLETION_ROLE, self.prompt),) if self.prompt is not None else self.messages
        payload = {"backend": backend, "model": model, "messages": messages, "params": params}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass
class GenerationResult:
    """The outcome of one request: ``texts`` (n samples) on success, ``error`` on failure.

    ``finish_reasons`` holds, per text, why generation stopped as the backend reported it (``"stop"``, or
    ``"length"`` when ``max_tokens`` cut the text short); empty when the backend did not say.
    """

    key: str
    texts: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    error: str | None = None
    finish_reasons: list[str | None] = field(default_factory=list)
    # Set with ``error`` when the cause will repeat for every request (a rejected key, an unknown model or path, a
    # server that cannot be reached): the generator stops a run after a few of them instead of sending the rest.
    fatal: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def truncated(self, index: int = 0) -> bool:
        """Whether text ``index`` was cut short by the token limit (a final answer read from it is not one)."""
        return index < len(self.finish_reasons) and self.finish_reasons[index] == "length"


def supports_completion(backend: Any) -> bool:
    """Whether ``backend`` answers raw-text completion requests (:meth:`GenerationRequest.completion`)."""
    return bool(getattr(backend, "supports_completion", False))


def backend_identity(backend: Any) -> str:
    """What tells a backend's answers apart in the cache: its ``cache_identity`` when it has one (a server's URL
    and extra request fields, a checkpoint's content digest), else its ``model``."""
    return getattr(backend, "cache_identity", None) or str(backend.model)


def folder_digest(path: str | os.PathLike) -> str:
    """A content-based identity of a model folder, independent of where it lies.

    Small files (configs, tokenizers: up to 1 MiB) are hashed by content; larger ones (weights) by relative
    name, size and modification time, which is cheap even for large checkpoints and changes whenever they are
    rewritten.
    """
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(str(file.relative_to(root).as_posix()).encode("utf-8") + b"\0")
        if stat.st_size <= _SMALL_FILE:
            digest.update(b"c" + hashlib.sha256(file.read_bytes()).digest())
        else:
            digest.update(f"s{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


_SMALL_FILE = 1 << 20


@runtime_checkable
class Backend(Protocol):
    """A text generator. Implementations: OpenAI-compatible HTTP, local transformers, vLLM offline, and any
    backend added by name with :func:`~swift_callbacks.generation.register_backend`."""

    name: str  # "openai", "transformers", "vllm", ... (part of the cache key)
    model: str  # model name or path (part of the cache key)
    # Optional: ``supports_completion = True`` when it answers raw-text requests (GenerationRequest.completion).

    def generate(self, requests: list[GenerationRequest]) -> Iterator[GenerationResult]:
        """Yield one result per request, in any order, as each finishes. Never raise for one bad request:
        report it as a result with ``error`` set (after the backend's own retries)."""
        ...
