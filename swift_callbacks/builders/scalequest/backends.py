"""The backends that run a model spec: generation, and scoring.

Question generation feeds a model only the chat template's prefix up to the user turn: a raw-text completion
request (:meth:`swift_callbacks.generation.GenerationRequest.completion`), which every shared backend of
:mod:`swift_callbacks.generation` answers. Scoring (reward models, the difficulty scorer) goes through the same
interface, so it is cached and resumable too. A spec naming a registered backend
(:func:`swift_callbacks.generation.register_backend`) is built by that backend's factory, for either use.

torch and transformers are imported inside functions only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ...configuration import ConfigError
from ...generation.base import GenerationRequest, GenerationResult
from ...generation.factory import api_key_from_env
from ...generation.openai_backend import OpenAICompatibleBackend
from ...generation.registry import UnknownBackendError, make_backend
from ...generation.transformers_backend import TransformersBackend
from ...generation.vllm_backend import VLLMBackend
from .models import ModelSpec, device_of, load_causal_lm, load_regression_model


def generation_backend(spec: ModelSpec) -> Any:
    """A backend answering chat and completion (raw prefix) requests with the model of ``spec``.

    Raises:
        ConfigError: A ``stage:`` spec the runner did not resolve, or a registered backend that is no longer there.
    """
    if spec.backend == "stage":
        raise ConfigError(f"model 'stage:{spec.model}' must be resolved to the stage's output folder first")
    if spec.registered:
        return registered_backend(spec)
    if spec.backend == "openai":
        return OpenAICompatibleBackend(
            spec.base_url, spec.model, api_key=api_key_from_env(spec.api_key_env),
            max_concurrency=spec.max_concurrency, timeout=spec.timeout, max_retries=spec.max_retries,
            extra_body=spec.extra_body,
        )  # fmt: skip
    if spec.backend == "vllm":
        backend = VLLMBackend(spec.model, chunk_size=spec.chunk_size, **spec.engine)
    elif spec.backend == "tiny":
        tokenizer, model = load_causal_lm(spec)
        backend = TransformersBackend(model, tokenizer, batch_size=spec.batch_size, device=spec.device)
    elif spec.trust_remote_code:  # the shared backend loads without remote code: hand it loaded objects
        tokenizer, model = load_causal_lm(spec)
        backend = TransformersBackend(model, tokenizer, batch_size=spec.batch_size, device=device_of(spec))
    else:
        backend = TransformersBackend(
            spec.model, spec.tokenizer, batch_size=spec.batch_size, device=spec.device, dtype=spec.dtype
        )
    backend.model = spec.identity()  # the cache key: a retrained folder at the same path is another model
    backend.cache_identity = backend.model
    return backend


def registered_backend(spec: ModelSpec) -> Any:
    """The backend a registered factory builds for ``spec`` (``factory(spec.model, **spec.options)``).

    Raises:
        ConfigError: No backend is registered under ``spec.backend`` any more.
    """
    try:
        return make_backend(spec.backend, spec.model, **spec.options)
    except UnknownBackendError as err:
        raise ConfigError(str(err)) from None


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
    """The backend scoring with ``spec``: a registered backend's, or :class:`SequenceScoreBackend`."""
    if spec.registered:
        return registered_backend(spec)
    if spec.backend == "stage":
        raise ConfigError(f"model 'stage:{spec.model}' must be resolved to the stage's output folder first")
    return SequenceScoreBackend(spec, text_format=text_format, max_length=max_length)
