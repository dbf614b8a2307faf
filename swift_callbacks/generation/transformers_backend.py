"""A local backend: batched ``generate`` of a Hugging Face causal LM on this machine.

torch and transformers are imported when a backend is built, never when this module is imported.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .base import GenerationRequest, GenerationResult, SamplingParams, folder_digest

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class TransformersBackend:
    """Chat generation with ``AutoModelForCausalLM.generate``.

    Requests with the same sampling settings are batched (left-padded, so every prompt ends where generation
    starts). ``temperature == 0`` is greedy decoding; otherwise sampling, seeded from ``SamplingParams.seed``
    when given. Generation runs inside ``torch.random.fork_rng``, so the caller's global RNG state is exactly the
    same afterwards (training code that shares the process stays reproducible).

    Args:
        model_or_path: A model directory or hub id, or an already loaded model.
        tokenizer: A tokenizer, or a directory/id; defaults to ``model_or_path`` (or the model's
            ``name_or_path``). It needs a chat template.
        batch_size: Prompts per ``generate`` call.
        device: Where to run, e.g. ``"cuda:0"``; defaults to CUDA when available (a loaded model stays put
            unless this is given).
        dtype: Weights dtype when loading, e.g. ``"bfloat16"`` or ``torch.bfloat16``; defaults to the
            checkpoint's.

    Raises:
        ValueError: If ``batch_size < 1`` or the tokenizer has no chat template.
    """

    name = "transformers"
    supports_completion = True  # answers GenerationRequest.completion (raw text) as well as chat requests

    def __init__(
        self,
        model_or_path: Any,
        tokenizer: Any = None,
        batch_size: int = 8,
        device: str | None = None,
        dtype: Any = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.hf_model = _load_model(model_or_path, device, dtype)
        self.model = str(model_or_path) if _is_path_like(model_or_path) else str(self.hf_model.name_or_path or "")
        # A local checkpoint is known in the cache by its content, so a retrained model at the same path is another
        # model and "./m" and "/abs/m" are the same one.
        self.cache_identity = (
            f"local:{folder_digest(model_or_path)}"
            if _is_path_like(model_or_path) and os.path.isdir(model_or_path)
            else None
        )
        if not self.model:
            # The model name is part of the cache key: two unnamed in-memory models would share cached answers.
            logger.warning("model has no name_or_path; cached answers of different unnamed models would collide")
        self.tokenizer = _load_tokenizer(tokenizer, model_or_path, self.hf_model)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer of {self.model!r} has no chat template; pass one that has")
        self._seed_source = random.Random()  # seeds for unseeded sampling, so the global RNGs are never read

    def __repr__(self) -> str:
        return f"TransformersBackend(model={self.model!r}, batch_size={self.batch_size}, device={self.device!s})"

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameters (where inputs go)."""
        return self.hf_model.device

    def generate(self, requests: list[GenerationRequest]) -> Iterator[GenerationResult]:
        """Generates batch by batch, yielding each batch's results as soon as it is done.

        A batch that fails (e.g. out of memory) is retried one request at a time, so one bad prompt only fails
        itself.

        Args:
            requests: Requests to answer.

        Yields:
            One result per request.
        """
        for batch in self._batches(requests):
            try:
                yield from self._run_batch(batch)
            except Exception as err:
                if len(batch) == 1:
                    yield GenerationResult(batch[0].key, error=f"{type(err).__name__}: {err}")
                    continue
                logger.warning("batch of %d failed (%s: %s); retrying one by one", len(batch), type(err).__name__, err)
                for req in batch:
                    yield from self.generate([req])

    def _batches(self, requests: list[GenerationRequest]) -> Iterator[list[GenerationRequest]]:
        # One generate call takes one set of sampling settings, so batches never mix settings.
        groups: dict[SamplingParams, list[GenerationRequest]] = {}
        for req in requests:
            groups.setdefault(req.params, []).append(req)
        for group in groups.values():
            for start in range(0, len(group), self.batch_size):
                yield group[start : start + self.batch_size]

    def _run_batch(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        import torch

        prompts = [self._encode(req) for req in batch]
        input_ids, attention_mask = _left_pad(prompts, self._pad_id(), self.device)
        params = batch[0].params
        # manual_seed reseeds every CUDA device, so every one of them is forked and restored, not just ours.
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(params.seed if params.seed is not None else self._seed_source.getrandbits(63))
            out = self.hf_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **self._generate_kwargs(params)
            )
        new_tokens = out[:, input_ids.shape[1] :].tolist()
        per = _sequences_per_prompt(params)
        # Greedy decoding yields one sequence per prompt; n greedy samples are n copies of it, as on a server.
        copies = params.n // per
        return [
            self._result(req, len(prompt), new_tokens[i * per : (i + 1) * per] * copies)
            for i, (req, prompt) in enumerate(zip(batch, prompts, strict=True))
        ]

    def _encode(self, req: GenerationRequest) -> list[int]:
        if req.is_completion:  # raw text as written: it already holds whatever special tokens it needs
            return list(self.tokenizer(req.prompt, add_special_tokens=False)["input_ids"])
        text = self.tokenizer.apply_chat_template(req.message_dicts(), tokenize=False, add_generation_prompt=True)
        # The template already wrote any BOS/special tokens it wants; adding them again would double them.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self._eos_ids()[0]

    def _eos_ids(self) -> list[int]:
        eos = self.hf_model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def _generate_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "num_return_sequences": _sequences_per_prompt(params),
            "pad_token_id": self._pad_id(),
        }
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            # Explicit Nones override sampling defaults a checkpoint's generation_config may carry.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        return kwargs

    def _result(self, req: GenerationRequest, prompt_len: int, samples: list[list[int]]) -> GenerationResult:
        eos = set(self._eos_ids())
        texts, completion_tokens, reasons = [], 0, []
        for ids in samples:
            ids = _until_eos(ids, eos)
            completion_tokens += len(ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = _cut_at_stop(text, req.params.stop)
            texts.append(cut)
            ended = bool(ids) and ids[-1] in eos
            reasons.append("length" if len(ids) >= req.params.max_tokens and not ended and cut == text else "stop")
        return GenerationResult(req.key, texts=texts, prompt_tokens=prompt_len, completion_tokens=completion_tokens,
                                finish_reasons=reasons)  # fmt: skip


def _sequences_per_prompt(params: SamplingParams) -> int:
    # transformers refuses num_return_sequences > 1 for greedy search (all would be identical anyway).
    return params.n if params.temperature > 0 else 1


def _is_path_like(obj: Any) -> bool:
    return isinstance(obj, str) or hasattr(obj, "__fspath__")


def _load_model(model_or_path: Any, device: str | None, dtype: Any) -> Any:
    import torch

    if _is_path_like(model_or_path):
        from ..models import ModelConfig, load_model

        dtype = str(dtype).removeprefix("torch.") if dtype is not None else "auto"
        model = load_model(ModelConfig(str(model_or_path), dtype=dtype))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    else:
        model = model_or_path
    if device is not None:
        model = model.to(device)
    return model.eval()


def _load_tokenizer(tokenizer: Any, model_or_path: Any, model: Any) -> Any:
    if tokenizer is not None and not _is_path_like(tokenizer):
        return tokenizer
    from ..models import ModelConfig, load_tokenizer

    source = tokenizer or (model_or_path if _is_path_like(model_or_path) else model.name_or_path)
    if not source:
        raise ValueError("a loaded model without name_or_path needs an explicit tokenizer")
    return load_tokenizer(ModelConfig(str(source)))


def _left_pad(prompts: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads token lists into ``input_ids`` and ``attention_mask`` (built by hand: the tokenizer is shared)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    """Keeps tokens up to and including the first end token (what follows is padding of finished rows)."""
    for pos, tok in enumerate(ids):
        if tok in eos:
            return ids[: pos + 1]
    return ids


def _cut_at_stop(text: str, stop: tuple[str, ...] | None) -> str:
    """Ends the text before the first stop string, as OpenAI-compatible servers do."""
    if not stop:
        return text
    cut = min((pos for s in stop if (pos := text.find(s)) >= 0), default=len(text))
    return text[:cut]
