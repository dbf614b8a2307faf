"""The generation interface every backend implements, and the records that flow through it.

Nothing here imports torch: builders and the CLI stay fast to start.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


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
    """One chat request.

    Attributes:
        key: Caller's id of the item the request belongs to (e.g. ``"<source id>/cot"``); used in records and
            rejects, not in the cache key.
        messages: The chat messages.
        params: Sampling settings.
    """

    key: str
    messages: tuple[tuple[str, str], ...]  # ((role, content), ...) so requests are hashable
    params: SamplingParams = SamplingParams()

    @classmethod
    def chat(cls, key: str, messages: Iterable[Message], params: SamplingParams | None = None) -> GenerationRequest:
        return cls(key, tuple((m["role"], m["content"]) for m in messages), params or SamplingParams())

    def message_dicts(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def cache_key(self, backend: str, model: str) -> str:
        """Stable hash of everything that determines the answer: backend, model, messages, sampling."""
        payload = {"backend": backend, "model": model, "messages": self.messages, "params": asdict(self.params)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass
class GenerationResult:
    """The outcome of one request: ``texts`` (n samples) on success, ``error`` on failure."""

    key: str
    texts: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class Backend(Protocol):
    """A text generator. Implementations: OpenAI-compatible HTTP, local transformers, vLLM offline."""

    name: str  # "openai", "transformers", "vllm", ... (part of the cache key)
    model: str  # model name or path (part of the cache key)

    def generate(self, requests: list[GenerationRequest]) -> Iterator[GenerationResult]:
        """Yield one result per request, in any order, as each finishes. Never raise for one bad request:
        report it as a result with ``error`` set (after the backend's own retries)."""
        ...


class ScriptedBackend:
    """A backend answering from a function of the request: for tests of parsing and templates only."""

    name = "scripted"

    def __init__(self, reply, model: str = "scripted") -> None:
        self.reply = reply
        self.model = model
        self.calls: list[GenerationRequest] = []

    def generate(self, requests: list[GenerationRequest]) -> Iterator[GenerationResult]:
        for req in requests:
            self.calls.append(req)
            try:
                out = self.reply(req)
            except Exception as err:  # scripted failure
                yield GenerationResult(req.key, error=f"{type(err).__name__}: {err}")
                continue
            texts = out if isinstance(out, list) else [out]
            yield GenerationResult(req.key, texts=texts, prompt_tokens=1, completion_tokens=len(texts))
