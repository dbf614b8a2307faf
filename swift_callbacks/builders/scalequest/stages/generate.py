"""Question generation from scratch: a question generator sees only the chat template's prefix up to the user turn
and writes a user question, stopping at its end-of-sequence token (what QFT taught it).

Example::

    from swift_callbacks.builders.scalequest import GenerateSettings, generate_questions
    from swift_callbacks.generation import Generator

    prefix = chat_prefix(tokenizer)                     # e.g. "<|im_start|>user\\n"
    with Generator(backend, "cache", desc="generate") as gen:
        generate_questions("generate.jsonl", generator=gen, prefix=prefix, settings=GenerateSettings(1000))
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ....generation.base import GenerationResult, supports_completion
from ...pipeline import Job, ask
from ...records import Reject
from ..contract import StageError, StageResult, StageStats, finish, generation_counts
from ..contract import fingerprint as make_fingerprint
from ..metrics import distribution, ratio
from ..models import load_tokenizer
from ..settings import Sampling, settings_dict
from .base import Stage, StageRun

_SENTINEL = "SCALEQUEST-QUESTION-SLOT-7f3a9c"


def chat_prefix(tokenizer: Any, system_prompt: str | None = None) -> str:
    """The text the chat template writes before the content of the first user message.

    Rendered with a placeholder user message and cut at the placeholder, so it works for any template (one that
    adds a default system prompt, a BOS token, a date line, ...).

    Args:
        tokenizer: A tokenizer with a chat template.
        system_prompt: A system message to put first, or None for the template's default.

    Returns:
        The prefix, e.g. ``"<|im_start|>user\\n"`` for ChatML without a system message.

    Raises:
        StageError: The tokenizer has no chat template, or the template does not copy the user text verbatim.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise StageError("the tokenizer has no chat template, so there is no chat prefix to generate from")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": _SENTINEL}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if _SENTINEL not in text:
        raise StageError("the chat template does not copy the user message verbatim; cannot find the user turn")
    return text[: text.index(_SENTINEL)]


def training_prompt(tokenizer: Any, prefix: str) -> str:
    """The prefix as a TRL prompt string: without a leading BOS text when the tokenizer adds BOS by itself.

    TRL tokenizes string prompts with the tokenizer's special tokens; a template that writes the BOS token as
    text would otherwise give two. Generation tokenizes the prefix as is (no special tokens added), so both see
    the same token sequence.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if bos and prefix.startswith(bos):
        ids = tokenizer("x")["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id:
            return prefix[len(bos) :]
    return prefix


@dataclass(frozen=True)
class GenerateSettings:
    """Settings of the ``generate`` stage.

    Attributes:
        num_questions: Questions to sample.
        samples_per_request: Samples asked for in one request (``n``); the unit the cache stores and resumes by.
        seed: Base seed; request ``j`` samples with a seed derived from it and ``j``, so reruns reproduce the
            samples and different requests differ.
        system_prompt: A system message in the prefix, or None for the template's default.
        id_prefix: Row ids are ``<id_prefix>-<request>-<sample>``.
        sampling: The paper's generation settings: temperature 1.0, top-p 0.99, at most 512 tokens.
    """

    num_questions: int = 1000
    samples_per_request: int = 16
    seed: int = 0
    system_prompt: str | None = None
    id_prefix: str = "gen"
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=1.0, top_p=0.99, max_tokens=512))

    def __post_init__(self) -> None:
        if self.num_questions < 1 or self.samples_per_request < 1:
            raise ValueError("num_questions and samples_per_request must be at least 1")


def sample_seed(seed: int, index: int) -> int:
    """A 31-bit seed for request ``index`` (hash-derived: base seeds 0 and 1 share no request seeds)."""
    return int(hashlib.sha256(f"{seed}:{index}".encode()).hexdigest(), 16) % (2**31)


def sample_questions(
    generator: Any, prefix: str, settings: GenerateSettings
) -> tuple[list[dict[str, Any]], list[Reject]]:
    """Samples ``settings.num_questions`` continuations of ``prefix``.

    Returns:
        Rows ``{"id", "question"}`` (stripped text, possibly empty) and one reject per sample lost to a failed
        request.

    Raises:
        StageError: The generator's backend cannot continue raw prefixes.
    """
    if not supports_completion(generator.backend):
        raise StageError(f"backend {generator.backend!r} cannot continue a raw chat prefix (it does not answer "
                         "GenerationRequest.completion)")  # fmt: skip
    sizes = _request_sizes(settings.num_questions, settings.samples_per_request)
    keys = [f"{settings.id_prefix}-{j:06d}" for j in range(len(sizes))]
    jobs = [Job(key, key, None, prefix, params=settings.sampling.params(n, sample_seed(settings.seed, j)))
            for j, (key, n) in enumerate(zip(keys, sizes, strict=True))]  # fmt: skip
    return ask(jobs, generator, _questions, failed=_failed)


def _questions(job: Job, result: GenerationResult) -> list[dict[str, Any] | Reject]:
    """The samples as question rows; a sample cut at the token limit is an unfinished question, rejected."""
    out: list[dict[str, Any] | Reject] = []
    for k in range(job.params.n):
        row = {"id": f"{job.key}-{k:03d}", "question": result.texts[k].strip()}
        if result.truncated(k):
            out.append(Reject(row["id"], "check", "truncated reply", row, f"ends: {row['question'][-200:]!r}"))
        else:
            out.append(row)
    return out


def _failed(job: Job, result: GenerationResult) -> list[Reject]:
    """A failed request loses each of its samples."""
    ids = [f"{job.key}-{k:03d}" for k in range(job.params.n)]
    return [Reject(row_id, "generate", "generation failed", {"id": row_id}, result.error or "") for row_id in ids]


def _request_sizes(total: int, per_request: int) -> list[int]:
    full, rest = divmod(total, per_request)
    return [per_request] * full + ([rest] if rest else [])


def generate_questions(
    output: str | os.PathLike,
    *,
    generator: Any,
    prefix: str,
    settings: GenerateSettings = GenerateSettings(),
    model_id: str | None = None,
    fingerprint: str | None = None,
) -> StageResult:
    """The ``generate`` stage: sample questions from the chat prefix alone and write them.

    Every finished sample is written, empty ones included: the ``filter-language`` stage drops and counts those.
    Samples lost to a failed request, or cut at the token limit (``truncated reply``), are rejects.

    Args:
        output: Output JSONL (rows ``id``, ``question``, ``generator``).
        generator: A :class:`~swift_callbacks.generation.Generator` over a prefix-capable backend.
        prefix: The chat prefix (see :func:`chat_prefix`).
        settings: Stage settings.
        model_id: The generator model's identity for provenance and the fingerprint (default: the backend's).
        fingerprint: The run's fingerprint (the pipeline runner passes its own); computed when None.

    Returns:
        The stage result.
    """
    started = time.perf_counter()
    model_id = model_id or getattr(generator.backend, "model", "")
    rows, rejects = sample_questions(generator, prefix, settings)
    for row in rows:
        row["generator"] = model_id
    lengths = [len(row["question"]) for row in rows]
    stats = StageStats(
        stage="generate", unit="questions", rows_in=settings.num_questions, rows_out=len(rows),
        metrics={"empty_questions": sum(1 for n in lengths if n == 0),
                 "empty_ratio": ratio(sum(1 for n in lengths if n == 0), len(rows)),
                 "question_chars": distribution(lengths), "prefix": prefix},
        generation={"generator": generation_counts(generator)}, settings=settings_dict(settings),
        fingerprint=fingerprint
        or make_fingerprint("generate", {"settings": settings, "prefix": prefix}, models=[model_id]),
    )  # fmt: skip
    return finish(output, rows, rejects, stats, started=started)


class Generate(Stage):
    name = "generate"
    settings = GenerateSettings
    roles: ClassVar[dict[str, str]] = {"model": "stage:qpo"}
    help = "questions from the chat prefix only (temperature 1.0, top-p 0.99, max 512 tokens)"
    main_role = "model"
    sampling_field = "sampling"

    def run(self, run: StageRun, stack: ExitStack) -> StageResult:
        spec = run.model("model")
        prefix = chat_prefix(load_tokenizer(spec), run.settings.system_prompt)
        return generate_questions(run.output, generator=run.generator(stack, "model"), prefix=prefix,
                                  settings=run.settings, model_id=spec.identity(),
                                  fingerprint=run.fingerprint)  # fmt: skip
