"""Responses: sample several step-by-step solutions per question, keep those with a final ``\\boxed{}`` answer, then
keep the best one per question by a reward model.

Example::

    with Generator(solver_backend, "cache", desc="respond") as solver:
        respond("questions.jsonl", "responses.jsonl", responder=solver)       # n = 5 samples per question
    with Generator(score_backend(ModelSpec.parse("path/to/reward-model"), text_format="chat"), "cache") as rm:
        reward_select("responses.jsonl", "best.jsonl", scorer=rm)
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

from ....answers import boxed_answer
from ....generation.base import GenerationResult, Message
from ...pipeline import Job, ask
from ...records import Reject
from ..backends import score_backend
from ..contract import StageResult, StageStats, finish, generation_counts, read_rows, score_rows
from ..contract import fingerprint as make_fingerprint
from ..metrics import distribution, histogram, ratio
from ..prompts import DEFAULT_PROMPTS, Prompts
from ..settings import Sampling, settings_dict
from .base import REQUIRED, Stage, StageRun


@dataclass(frozen=True)
class RespondSettings:
    """Settings of ``respond``.

    Attributes:
        n: Solutions sampled per question (the paper: 5).
        question_field: The column holding the question.
        seed: Sampling seed of every request (None: the backend's own randomness; the cache still makes reruns
            reproduce the first run).
        sampling: The paper's settings: temperature 0.7, top-p 0.95.
    """

    n: int = 5
    question_field: str = "question"
    seed: int | None = None
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, top_p=0.95, max_tokens=2048))

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")


def respond(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    responder: Any,
    settings: RespondSettings = RespondSettings(),
    prompts: Prompts = DEFAULT_PROMPTS,
    fingerprint: str | None = None,
) -> StageResult:
    """The ``respond`` stage: ``n`` chain-of-thought samples per question, each kept only with a final boxed answer.

    The unit is the sample: ``rows_in`` is questions x ``n``, ``rows_out`` the samples kept. A sample without a
    final ``\\boxed{}`` answer is dropped as ``no final boxed answer``; the ``n`` samples of a failed request are
    dropped as ``generation failed``; invalid input rows count ``n`` samples each as well. Output rows:
    ``id`` (``<question id>/<k>``), ``question_id``, ``question``, ``response``, ``answer``, ``sample_index``.

    Args:
        input: Input JSONL with the question column.
        output: Output JSONL.
        responder: A :class:`~swift_callbacks.generation.Generator` for the solver model.
        settings: Stage settings.
        prompts: The prompt templates (``respond``).
        fingerprint: The run's fingerprint (computed when None).

    Returns:
        The stage result; ``metrics.answer_presence_ratio`` is the fraction of generated samples with an answer.
    """
    started = time.perf_counter()
    rows, bad, rows_in = read_rows(input, [settings.question_field])
    rejects = [Reject(f"{r.source_id}/{k}", r.stage, r.reason, r.row, r.detail) for r in bad for k in range(settings.n)]
    jobs = [Job(row["id"], row["id"], row, prompts.messages("respond", row[settings.question_field])) for row in rows]
    params = settings.sampling.params(settings.n, settings.seed)
    kept, dropped = ask(jobs, responder, partial(_samples, settings), params, failed=partial(_failed, settings.n))
    rejects += dropped
    generated = len(kept) + sum(1 for r in dropped if r.stage == "check")
    answered = len({sample["question_id"] for sample in kept})
    stats = StageStats(
        stage="respond", unit="samples", rows_in=rows_in * settings.n, rows_out=len(kept),
        metrics={"questions_in": rows_in, "samples_generated": generated,
                 "answer_presence_ratio": ratio(len(kept), generated),
                 "questions_with_an_answer": answered, "questions_without_an_answer": len(rows) - answered},
        generation={"responder": generation_counts(responder)}, settings=settings_dict(settings),
        fingerprint=fingerprint or make_fingerprint("respond", {"settings": settings, "prompts": prompts}, [input],
                                                    [getattr(responder.backend, "model", "")]),
    )  # fmt: skip
    return finish(output, kept, rejects, stats, started=started)


def _samples(settings: RespondSettings, job: Job, result: GenerationResult) -> list[dict[str, Any] | Reject]:
    """The kept samples (dicts) and dropped ones (rejects) of one question."""
    qid, question = job.key, job.raw[settings.question_field]
    out: list[dict[str, Any] | Reject] = []
    for k, text in enumerate(result.texts[: settings.n]):
        answer = boxed_answer(text)
        sample = {"id": f"{qid}/{k}", "question_id": qid, "question": question, "response": text, "answer": answer,
                  "sample_index": k}  # fmt: skip
        if result.truncated(k):  # cut at max_tokens: a box in unfinished reasoning is not the final answer
            out.append(Reject(sample["id"], "check", "truncated reply", sample, f"ends: {text[-200:]!r}"))
        elif answer is None:
            out.append(Reject(sample["id"], "check", "no final boxed answer", sample, f"ends: {text[-200:]!r}"))
        else:
            out.append(sample)
    return out


def _failed(n: int, job: Job, result: GenerationResult) -> list[Reject]:
    """A failed request drops each of its ``n`` samples."""
    return [Reject(f"{job.key}/{k}", "generate", "generation failed", job.raw, result.error or "") for k in range(n)]


class Respond(Stage):
    name = "respond"
    settings = RespondSettings
    roles: ClassVar[dict[str, str]] = {"model": REQUIRED}
    input_from = "difficulty"
    uses_prompts = True
    help = "n step-by-step solutions per question, kept only with a final \\boxed{} answer"
    main_role = "model"
    sampling_field = "sampling"
    headline_metric = "answer_presence_ratio"

    def run(self, run: StageRun, stack: ExitStack) -> StageResult:
        return respond(run.input, run.output, responder=run.generator(stack, "model"), settings=run.settings,
                       prompts=run.prompts, fingerprint=run.fingerprint)  # fmt: skip


# ------------------------------------------------------------------------------------------------ reward-select


@dataclass(frozen=True)
class RewardSettings:
    """Settings of ``reward-select``.

    Attributes:
        bins: Bins of the reward histogram in the stats (over the observed range).
    """

    bins: int = 10


def reward_select(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    scorer: Any,
    settings: RewardSettings = RewardSettings(),
    fingerprint: str | None = None,
) -> StageResult:
    """The ``reward-select`` stage: scores every response and keeps the best one per question.

    The scorer sees the conversation (the question as the user turn, the response as the assistant turn) and
    answers with a number (a :class:`~.models.SequenceScoreBackend` over a reward model, or a registered backend
    that answers with one).
    The unit is the response: ``rows_in`` responses, ``rows_out`` selected ones (one per question); the others
    are dropped as ``not the best response`` (ties go to the lowest sample index), and responses whose scoring
    failed or was not a number are dropped with that reason. Output rows carry ``reward``, ``candidates`` and a
    ready SFT ``messages`` column.

    Args:
        input: The ``respond`` output (``question_id``, ``question``, ``response``, ``answer``, ``sample_index``).
        output: Output JSONL.
        scorer: A :class:`~swift_callbacks.generation.Generator` whose backend returns scores.
        settings: Stage settings.
        fingerprint: The run's fingerprint (computed when None).

    Returns:
        The stage result; ``metrics.reward_all`` / ``reward_selected`` are min/median/max/mean distributions.
    """
    started = time.perf_counter()
    rows, rejects, rows_in = read_rows(input, ["question_id", "question", "response"])
    scored, dropped = score_rows(rows, scorer, _conversation, "reward")
    rejects += dropped
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in scored:
        groups.setdefault(row["question_id"], []).append(row)
    selected = []
    for candidates in groups.values():
        best = max(candidates, key=lambda r: (r["reward"], -int(r.get("sample_index") or 0)))
        selected.append(_final_row(best, len(candidates)))
        rejects += [Reject(r["id"], "select", "not the best response", r, _why_not(r, best))
                    for r in candidates if r is not best]  # fmt: skip
    rewards = [r["reward"] for r in scored]
    stats = StageStats(
        stage="reward-select", unit="responses", rows_in=rows_in, rows_out=len(selected),
        metrics={"questions": len(groups), "reward_all": distribution(rewards),
                 "reward_selected": distribution([r["reward"] for r in selected]),
                 "reward_histogram": _histogram(rewards, settings.bins)},
        generation={"scorer": generation_counts(scorer)}, settings=settings_dict(settings),
        fingerprint=fingerprint or make_fingerprint("reward-select", settings, [input],
                                                    [getattr(scorer.backend, "model", "")]),
    )  # fmt: skip
    return finish(output, selected, rejects, stats, started=started)


def _conversation(row: dict[str, Any]) -> list[Message]:
    return [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["response"]}]


def _why_not(row: dict[str, Any], best: dict[str, Any]) -> str:
    if row["reward"] < best["reward"]:
        return f"reward {row['reward']:.6g} < {best['reward']:.6g} of {best['id']}"
    return f"reward tied with {best['id']}, which has the lower sample index"


def _final_row(best: dict[str, Any], candidates: int) -> dict[str, Any]:
    row = {k: v for k, v in best.items() if k not in ("id", "question_id")}
    messages = [{"role": "user", "content": best["question"]}, {"role": "assistant", "content": best["response"]}]
    return {"id": best["question_id"], "response_id": best["id"], **row, "candidates": candidates,
            "messages": messages}  # fmt: skip


def _histogram(values: list[float], bins: int) -> dict[str, Any] | None:
    if not values:
        return None
    low, high = min(values), max(values)
    return histogram(values, bins, low, high if high > low else low + 1.0)


class RewardSelect(Stage):
    name = "reward-select"
    settings = RewardSettings
    roles: ClassVar[dict[str, str]] = {"reward_model": REQUIRED}
    input_from = Respond.name
    help = "keep the best solution per question by a reward model"
    role_flags: ClassVar[dict[str, str]] = {"reward_model": "--reward-model"}

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--cache-dir", default=".swift_cache/generation", help="score cache directory")

    def run(self, run: StageRun, stack: ExitStack) -> StageResult:
        from ....generation.runner import Generator

        backend = score_backend(run.model("reward_model"), text_format="chat")
        scorer = stack.enter_context(Generator(backend, run.cache_dir, desc=f"{self.name}:reward_model"))
        return reward_select(run.input, run.output, scorer=scorer, settings=run.settings,
                             fingerprint=run.fingerprint)  # fmt: skip

    def headline(self, stats: StageStats) -> str:
        mean = (stats.metrics.get("reward_selected") or {}).get("mean")
        return f"selected reward mean {mean:.4g}" if isinstance(mean, float) else "selected reward mean -"
