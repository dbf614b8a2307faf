"""The question filters: language (all-ASCII, non-empty) and solvability (an LLM judge with a strict final verdict).

Example::

    filter_language("generate.jsonl", "language.jsonl")
    with Generator(judge_backend, "cache", desc="solvable") as judge:
        filter_solvable("language.jsonl", "solvable.jsonl", judge=judge)
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ....answers import parse_final_verdict
from ....generation.base import GenerationResult
from ...pipeline import Job, ask
from ...records import Reject, reject_counts
from ..contract import StageResult, StageStats, finish, generation_counts, read_rows
from ..contract import fingerprint as make_fingerprint
from ..metrics import ratio
from ..prompts import DEFAULT_PROMPTS, Prompts
from ..settings import Sampling, settings_dict
from .base import REQUIRED, Stage, StageRun


@dataclass(frozen=True)
class LanguageSettings:
    """Settings of ``filter-language``.

    Attributes:
        question_field: The column holding the question.
    """

    question_field: str = "question"


def filter_language(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    settings: LanguageSettings = LanguageSettings(),
    fingerprint: str | None = None,
) -> StageResult:
    """The ``filter-language`` stage: keeps questions that are non-empty after stripping and entirely ASCII.

    The question is written back stripped of surrounding whitespace. Dropped rows go to the rejects file with the
    reason ``empty question`` or ``non-ASCII characters`` (the detail lists the first offending characters).

    Args:
        input: Input JSONL with the question column.
        output: Output JSONL.
        settings: Stage settings.
        fingerprint: The run's fingerprint (computed when None).

    Returns:
        The stage result.
    """
    started = time.perf_counter()
    rows, rejects, rows_in = read_rows(input, [settings.question_field])
    kept = []
    for row in rows:
        text = row[settings.question_field].strip()
        if not text:
            rejects.append(Reject(row["id"], "filter", "empty question", row))
        elif not text.isascii():
            odd = sorted({c for c in text if not c.isascii()})[:8]
            rejects.append(Reject(row["id"], "filter", "non-ASCII characters", row, f"characters: {''.join(odd)!r}"))
        else:
            kept.append({**row, settings.question_field: text})
    stats = StageStats(
        stage="filter-language", unit="questions", rows_in=rows_in, rows_out=len(kept),
        settings=settings_dict(settings),
        fingerprint=fingerprint or make_fingerprint("filter-language", settings, [input]),
    )  # fmt: skip
    return finish(output, kept, rejects, stats, started=started)


class FilterLanguage(Stage):
    name = "filter-language"
    settings = LanguageSettings
    input_from = "generate"
    help = "keep non-empty, all-ASCII questions"

    def run(self, run: StageRun, stack: ExitStack) -> StageResult:
        return filter_language(run.input, run.output, settings=run.settings, fingerprint=run.fingerprint)

    def headline(self, stats: StageStats) -> str:
        return "-" if stats.kept_ratio is None else f"kept_ratio {stats.kept_ratio:.4g}"


@dataclass(frozen=True)
class SolvableSettings:
    """Settings of ``filter-solvable``.

    Attributes:
        question_field: The column holding the question.
        sampling: The judge's sampling (greedy: a verdict should not depend on luck).
    """

    question_field: str = "question"
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.0, top_p=1.0, max_tokens=1024))


def filter_solvable(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    judge: Any,
    settings: SolvableSettings = SolvableSettings(),
    prompts: Prompts = DEFAULT_PROMPTS,
    fingerprint: str | None = None,
) -> StageResult:
    """The ``filter-solvable`` stage: an LLM judge reasons about each question and ends with a Yes/No verdict.

    The verdict is parsed strictly from the reply's final line (see
    :func:`~swift_callbacks.answers.parse_final_verdict`). Yes keeps the row; No drops it as
    ``judged unsolvable``; a reply without a final verdict drops it as ``no final verdict`` (never a silent yes);
    a failed request drops it as ``generation failed``.

    Args:
        input: Input JSONL with the question column.
        output: Output JSONL (the kept rows, unchanged).
        judge: A :class:`~swift_callbacks.generation.Generator` for the judge model.
        settings: Stage settings.
        prompts: The prompt templates (``solvability_judge``).
        fingerprint: The run's fingerprint (computed when None).

    Returns:
        The stage result; ``metrics.solvable_ratio`` is yes / (yes + no).
    """
    started = time.perf_counter()
    rows, rejects, rows_in = read_rows(input, [settings.question_field])
    jobs = [Job(r["id"], r["id"], r, prompts.messages("solvability_judge", r[settings.question_field])) for r in rows]
    kept, dropped = ask(jobs, judge, _verdict, settings.sampling.params())
    rejects += dropped
    counts = reject_counts(dropped)
    verdicts = {"yes": len(kept), "no": counts["check: judged unsolvable"],
                "none": sum(n for reason, n in counts.items() if reason.startswith("parse:")),
                "failed": counts["generate: generation failed"]}  # fmt: skip
    stats = StageStats(
        stage="filter-solvable", unit="questions", rows_in=rows_in, rows_out=len(kept),
        metrics={"verdicts": verdicts, "solvable_ratio": ratio(verdicts["yes"], verdicts["yes"] + verdicts["no"])},
        generation={"judge": generation_counts(judge)}, settings=settings_dict(settings),
        fingerprint=fingerprint or make_fingerprint("filter-solvable", {"settings": settings, "prompts": prompts},
                                                    [input], [getattr(judge.backend, "model", "")]),
    )  # fmt: skip
    return finish(output, kept, rejects, stats, started=started)


def _verdict(job: Job, result: GenerationResult) -> list[Any]:
    """The row when the judge's final verdict is Yes, else the reject saying why not."""
    reply = result.texts[0]
    ends = f"reply ends: {reply[-300:]!r}"
    if result.truncated(0):  # cut at max_tokens: a "Yes" line in unfinished reasoning is no verdict
        return [job.reject("parse", "truncated reply", ends)]
    verdict = parse_final_verdict(reply)
    if verdict is None:
        return [job.reject("parse", "no final verdict", ends)]
    return [job.raw] if verdict else [job.reject("check", "judged unsolvable", ends)]


class FilterSolvable(Stage):
    name = "filter-solvable"
    settings = SolvableSettings
    roles: ClassVar[dict[str, str]] = {"judge": REQUIRED}
    input_from = FilterLanguage.name
    uses_prompts = True
    help = "keep questions an LLM judge calls solvable (strict final Yes/No)"
    main_role = "judge"
    sampling_field = "sampling"
    headline_metric = "solvable_ratio"

    def run(self, run: StageRun, stack: ExitStack) -> StageResult:
        return filter_solvable(run.input, run.output, judge=run.generator(stack, "judge"), settings=run.settings,
                               prompts=run.prompts, fingerprint=run.fingerprint)  # fmt: skip
