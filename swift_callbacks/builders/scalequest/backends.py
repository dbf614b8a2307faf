"""The backends that run a model spec: generation that can also continue raw chat prefixes, and scoring.

Question generation feeds a model only the chat template's prefix up to the user turn, which chat APIs cannot
express. The backends here add that to the shared ones of :mod:`swift_callbacks.generation`: a request whose single
message has the role ``"prefix"`` is sent as raw text (transformers: tokenized as is; vLLM: ``LLM.generate``;
OpenAI-compatible servers: the ``/v1/completions`` endpoint). Every other request is an ordinary chat request.
Scoring (reward models, the difficulty scorer) goes through the same interface, so it is cached and resumable too.

torch and transformers are imported inside functions only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ...configuration import ConfigError
from ...generation.base import GenerationRequest, GenerationResult, SamplingParams
from ...generation.openai_backend import OpenAICompatibleBackend
from ...generation.transformers_backend import TransformersBackend
from ...generation.vllm_backend import VLLMBackend
from .models import ModelSpec, device_of, load_causal_lm, load_regression_model

PREFIX_ROLE = "prefix"


def prefix_request(key: str, prefix: str, params: SamplingParams) -> GenerationRequest:
    """A request to continue ``prefix`` as raw text (the chat template's prefix up to the user turn)."""
    return GenerationRequest(key, ((PREFIX_ROLE, prefix),), params)


def is_prefix_request(req: GenerationRequest) -> bool:
    return len(req.messages) == 1 and req.messages[0][0] == PREFIX_ROLE


def supports_prefix(backend: Any) -> bool:
    """Whether ``backend`` can continue raw prefixes (the plain chat backends would template them as chat)."""
    from ...generation.base import ScriptedBackend

    return bool(getattr(backend, "supports_prefix", False)) or isinstance(backend, ScriptedBackend)


class PrefixTransformersBackend(TransformersBackend):
    """:class:`TransformersBackend` that also continues raw prefixes (tokenized as they are, no special tokens
    added: the prefix already holds whatever the chat template writes first)."""

    supports_prefix = True

    def _encode(self, req: GenerationRequest) -> list[int]:
        if is_prefix_request(req):
            return list(self.tokenizer(req.messages[0][1], add_special_tokens=False)["input_ids"])
        return super()._encode(req)


class PrefixVLLMBackend(VLLMBackend):
    """:class:`VLLMBackend` that sends raw prefixes through ``LLM.generate`` and chat requests through ``LLM.chat``."""

    supports_prefix = True

    def generate(self, requests: list[GenerationRequest]) -> Iterator[GenerationResult]:
        prefix = [req for req in requests if is_prefix_request(req)]
        chat = [req for req in requests if not is_prefix_request(req)]
        yield from super().generate(chat)
        yield from self._in_chunks(prefix, lambda chunk, sampling: self.llm.generate(
            [req.messages[0][1] for req in chunk], sampling_params=sampling, use_tqdm=False))  # fmt: skip


class _UnusableCompletion(Exception):
    """The server answered 200 but with fewer choices than asked or without text."""


class PrefixOpenAIBackend(OpenAICompatibleBackend):
    """:class:`OpenAICompatibleBackend` that sends raw prefixes to ``/v1/completions`` (vLLM, SGLang and TGI serve
    it), with the same retries, concurrency and key handling as chat requests."""

    supports_prefix = True

    def _call(self, req: GenerationRequest) -> GenerationResult:
        if not is_prefix_request(req):
            return super()._call(req)
        p = req.params
        response = self._client.completions.create(
            model=self.model,
            prompt=req.messages[0][1],
            temperature=p.temperature,
            top_p=p.top_p,
            max_tokens=p.max_tokens,
            n=p.n,
            **({"seed": p.seed} if p.seed is not None else {}),
            **({"stop": list(p.stop)} if p.stop else {}),
            **({"extra_body": self.extra_body} if self.extra_body else {}),
        )
        choices = sorted(response.choices or [], key=lambda c: c.index)
        if len(choices) < p.n or any(c.text is None for c in choices[: p.n]):
            raise _UnusableCompletion(f"server returned {len(choices)} usable choice(s), {p.n} requested")
        usage = response.usage
        return GenerationResult(
            req.key,
            texts=[c.text for c in choices[: p.n]],
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            finish_reasons=[getattr(c, "finish_reason", None) for c in choices[: p.n]],
        )


def generation_backend(spec: ModelSpec) -> Any:
    """A backend answering chat and prefix requests with the model of ``spec``.

    Raises:
        ConfigError: A ``stage:`` spec the runner did not resolve, or an unknown scripted stand-in.
    """
    if spec.backend == "stage":
        raise ConfigError(f"model 'stage:{spec.model}' must be resolved to the stage's output folder first")
    if spec.backend == "scripted":
        from .scripted import scripted_backend

        return scripted_backend(spec.model)
    if spec.backend == "openai":
        from ...generation.factory import _api_key_from_env

        return PrefixOpenAIBackend(
            spec.base_url, spec.model, api_key=_api_key_from_env(spec.api_key_env),
            max_concurrency=spec.max_concurrency, timeout=spec.timeout, max_retries=spec.max_retries,
            extra_body=spec.extra_body,
        )  # fmt: skip
    if spec.backend == "vllm":
        backend = PrefixVLLMBackend(spec.model, chunk_size=spec.chunk_size, **spec.engine)
    elif spec.backend == "tiny":
        tokenizer, model = load_causal_lm(spec)
        backend = PrefixTransformersBackend(model, tokenizer, batch_size=spec.batch_size, device=spec.device)
    elif spec.trust_remote_code:  # the shared backend loads without remote code: hand it loaded objects
        tokenizer, model = load_causal_lm(spec)
        backend = PrefixTransformersBackend(model, tokenizer, batch_size=spec.batch_size, device=device_of(spec))
    else:
        backend = PrefixTransformersBackend(
            spec.model, spec.tokenizer, batch_size=spec.batch_size, device=spec.device, dtype=spec.dtype
        )
    backend.model = spec.identity()  # the cache key: a retrained folder at the same path is another model
    backend.cache_identity = backend.model
    return backend


class SequenceScoreBackend:
    """Scores texts with a one-output sequence classification model, behind the generation interface.

    Going through :class:`~swift_callbacks.generation.Generator` gives scoring the same cache, resume and progress
    bar as generation. Each request is answered with one text: the score as a decimal string (``repr(float)``).

    Args:
        spec: The model (tiny or a folder).
        text_format: ``"chat"`` renders the messages with the tokenizer's chat template (reward models score a
            conversation); ``"text"`` joins the message contents with blank lines (the difficulty scorer reads the
            question alone).
        max_length: Tokens kept per text (the start is kept).
        model: An already loaded ``(tokenizer, model)`` pair, instead of loading ``spec``.
    """

    name = "sequence-score"

    def __init__(
        self, spec: ModelSpec, *, text_format: str = "chat", max_length: int = 2048, model: Any = None
    ) -> None:
        if text_format not in ("chat", "text"):
            raise ValueError(f"text_format must be 'chat' or 'text', got {text_format!r}")
        self.tokenizer, self.hf_model = model if model is not None else load_regression_model(spec)
        self.model = f"{spec.identity()}#{text_format}"
        self.text_format = text_format
        self.max_length = max_length
        self.batch_size = spec.batch_size
        self.hf_model.to(device_of(spec)).eval()

    def generate(self, requests: list[GenerationRequest]) -> Iterator[GenerationResult]:
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            try:
                scores = self._score([self._text(req) for req in batch])
            except Exception as err:  # one failing batch fails its requests only
                for req in batch:
                    yield GenerationResult(req.key, error=f"{type(err).__name__}: {err}")
                continue
            for req, score in zip(batch, scores, strict=True):
                yield GenerationResult(req.key, texts=[repr(score)], prompt_tokens=0, completion_tokens=0)

    def _text(self, req: GenerationRequest) -> str:
        messages = req.message_dicts()
        if self.text_format == "chat" and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n\n".join(m["content"] for m in messages)

    def _score(self, texts: list[str]) -> list[float]:
        import torch

        # A chat-templated text already holds its special tokens; plain text gets the tokenizer's own.
        special = not (self.text_format == "chat" and getattr(self.tokenizer, "chat_template", None))
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             add_special_tokens=special, return_tensors="pt")  # fmt: skip
        enc = {k: v.to(self.hf_model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            logits = self.hf_model(**enc).logits
        return [float(v) for v in logits[:, 0].float().cpu()]


def score_backend(spec: ModelSpec, *, text_format: str, max_length: int = 2048) -> Any:
    """The backend scoring with ``spec``: a scripted stand-in, or :class:`SequenceScoreBackend`."""
    if spec.backend == "scripted":
        from .scripted import scripted_backend

        return scripted_backend(spec.model)
    if spec.backend == "stage":
        raise ConfigError(f"model 'stage:{spec.model}' must be resolved to the stage's output folder first")
    return SequenceScoreBackend(spec, text_format=text_format, max_length=max_length)
