"""A local backend on vLLM's offline engine (``vllm.LLM.chat``), for fast generation on GPUs.

vLLM is an optional extra: importing this module never imports it; building a backend does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .base import GenerationRequest, GenerationResult, SamplingParams

INSTALL_HINT = "VLLMBackend needs vLLM: pip install 'swift-callbacks[vllm]' (or pip install vllm)"


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return vllm


class VLLMBackend:
    """Chat generation with ``vllm.LLM.chat``, which applies the model's chat template itself.

    Requests are handed to vLLM in chunks of ``chunk_size`` (vLLM schedules within a chunk far better than we
    could), and each chunk's results are yielded as soon as it finishes, so the cache fills as the build goes.

    Args:
        model: Model directory or hub id.
        chunk_size: Requests per ``LLM.chat`` call.
        **engine_kwargs: Passed to ``vllm.LLM`` (e.g. ``tensor_parallel_size=2``, ``dtype="bfloat16"``,
            ``gpu_memory_utilization=0.85``).

    Raises:
        ImportError: If vLLM is not installed (the message names the extra to install).
    """

    name = "vllm"
    supports_completion = True  # answers GenerationRequest.completion (raw text) as well as chat requests

    def __init__(self, model: str, *, chunk_size: int = 256, **engine_kwargs: Any) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self._vllm = _import_vllm()
        self.model = str(model)
        self.chunk_size = chunk_size
        self.llm = self._vllm.LLM(model=self.model, **engine_kwargs)

    def __repr__(self) -> str:
        return f"VLLMBackend(model={self.model!r}, chunk_size={self.chunk_size})"

    def generate(self, requests: list[GenerationRequest]) -> Iterator[GenerationResult]:
        """Generates chunk by chunk; a chunk that fails is reported as failed for each of its requests.

        Args:
            requests: Requests to answer.

        Yields:
            One result per request.
        """
        chat = [req for req in requests if not req.is_completion]
        raw = [req for req in requests if req.is_completion]
        yield from self._in_chunks(chat, lambda chunk, sampling: self.llm.chat(
            [req.message_dicts() for req in chunk], sampling_params=sampling, use_tqdm=False))  # fmt: skip
        yield from self._in_chunks(raw, lambda chunk, sampling: self.llm.generate(
            [req.prompt for req in chunk], sampling_params=sampling, use_tqdm=False))  # fmt: skip

    def _in_chunks(self, requests: list[GenerationRequest], call: Any) -> Iterator[GenerationResult]:
        """Runs ``call(chunk, sampling_params)`` chunk by chunk (so results reach the cache as they come); a chunk
        the engine fails is reported as failed for each of its requests."""
        for start in range(0, len(requests), self.chunk_size):
            chunk = requests[start : start + self.chunk_size]
            try:
                outputs = call(chunk, [self._sampling(req.params) for req in chunk])
            except Exception as err:  # the engine failed the whole call; report each request, keep going
                for req in chunk:
                    yield GenerationResult(req.key, error=f"{type(err).__name__}: {err}")
                continue
            for req, out in zip(chunk, outputs, strict=True):
                yield _to_result(req, out)

    def _sampling(self, params: SamplingParams) -> Any:
        return self._vllm.SamplingParams(
            n=_samples_to_ask(params),
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            seed=params.seed,
            stop=list(params.stop) if params.stop else None,
        )


def _samples_to_ask(params: SamplingParams) -> int:
    # Some vLLM versions refuse n > 1 with greedy sampling; the n answers would be identical anyway.
    return params.n if params.temperature > 0 else 1


def _to_result(req: GenerationRequest, out: Any) -> GenerationResult:
    wanted = _samples_to_ask(req.params)
    samples = sorted(out.outputs, key=lambda o: o.index)
    if len(samples) < wanted:
        return GenerationResult(req.key, error=f"vLLM returned {len(samples)} sample(s), {wanted} requested")
    samples = samples[:wanted] * (req.params.n // wanted)
    return GenerationResult(
        req.key,
        texts=[s.text for s in samples],
        prompt_tokens=len(out.prompt_token_ids or []),
        completion_tokens=sum(len(s.token_ids) for s in samples),
        finish_reasons=[getattr(s, "finish_reason", None) for s in samples],
    )
