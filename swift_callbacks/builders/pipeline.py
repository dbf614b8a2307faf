"""The loop every builder and every ScaleQuest LLM stage shares: plan requests, generate, parse, keep or reject.

:func:`ask` is the loop: it sends the requests of a list of :class:`Job` (the generator's cache answers what is
already done), turns a failed request into a reject, and sorts what a reader makes of each answer (all its ``n``
samples) into outputs and rejects. A builder only says how to turn rows into requests (:meth:`Builder.plan`) and a
reply into outputs (:meth:`Builder.finish`); a stage supplies its jobs and a reader. Caching, failures, rejects,
provenance and counting live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..generation.base import GenerationRequest, GenerationResult, Message, SamplingParams
from .parsing import Rejection, wrong_language
from .records import FORMATS, BuildResult, BuildStats, Example, Provenance, Reject, format_example, reject_counts
from .schema import Field, Row, parse_mapping, validate_rows
from .templating import TemplateSet


@dataclass
class Job:
    """One generation request and what is needed to turn its reply into outputs.

    Attributes:
        key: Unique request key, e.g. ``"<source id>/cot"``.
        source_id: Id written into rejects (a row's id, or a batch name).
        raw: Input written into rejects.
        messages: The chat messages to send, or a raw text to continue (a completion request).
        context: Builder-specific data for :meth:`Builder.finish` (e.g. the row).
        params: This job's sampling (``n`` samples, a seed), or None for the run's.
    """

    key: str
    source_id: str
    raw: Any
    messages: list[Message] | str
    context: dict[str, Any] = field(default_factory=dict)
    params: SamplingParams | None = None

    def request(self, params: SamplingParams | None) -> GenerationRequest:
        if isinstance(self.messages, str):
            return GenerationRequest.completion(self.key, self.messages, self.params or params)
        return GenerationRequest.chat(self.key, self.messages, self.params or params)

    def reject(self, stage: str, reason: str, detail: str = "") -> Reject:
        return Reject(self.source_id, stage, reason, self.raw, detail)


Reader = Callable[[Job, GenerationResult], Iterable[Any]]


def ask(
    jobs: Sequence[Job],
    generator: Any,
    read: Reader,
    params: SamplingParams | None = None,
    *,
    failed: Callable[[Job, GenerationResult], Iterable[Reject]] | None = None,
) -> tuple[list[Any], list[Reject]]:
    """The generate -> parse -> reject loop.

    Args:
        jobs: The requests to send, with what is needed to read their answers.
        generator: A ``generation.runner.Generator`` (anything with ``run(requests)``).
        read: Turns one answered job (all its samples) into outputs and :class:`Reject` items.
        params: Sampling of the jobs that have none of their own.
        failed: The rejects of a failed request (default: :func:`failed_request`).

    Returns:
        ``(outputs, rejects)``, both in job order.
    """
    results = generator.run([job.request(params) for job in jobs]) if jobs else {}
    outputs: list[Any] = []
    rejects: list[Reject] = []
    for job in jobs:
        result = results[job.key]
        for item in read(job, result) if result.ok else (failed or failed_request)(job, result):
            (rejects if isinstance(item, Reject) else outputs).append(item)
    return outputs, rejects


def failed_request(job: Job, result: GenerationResult, reason: str = "generation failed") -> list[Reject]:
    """The reject of a request that failed; its detail names the request when that is not the row itself."""
    detail = result.error or ""
    return [job.reject("generate", reason, detail if job.key == job.source_id else f"[{job.key}] {detail}")]


@dataclass
class Plan:
    """A build before generation: the requests it would send and what was rejected on the way."""

    jobs: list[Job]
    rejects: list[Reject]
    rows_in: int


class Builder:
    """Base of the builders.

    Attributes:
        kind: Build name (``"cot"``, ``"rules-apply"``, ...).
        fields: Input fields read from each row.
        group_by: Output column splitting the result into one dataset per value, or None.
        sampling: Default sampling settings (greedy where the reply must agree with a reference).
    """

    kind: str = ""
    fields: tuple[Field, ...] = ()
    group_by: str | None = None
    sampling: SamplingParams = SamplingParams(temperature=0.0, max_tokens=1024)
    # Reject a reply whose language is not the template's (builders whose replies are free prose in that language).
    checks_language: bool = False

    def __init__(self, templates: TemplateSet, *, fmt: str = "prompt-completion") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}; choose one of {list(FORMATS)}")
        self.templates = templates
        self.fmt = fmt

    def plan(self, rows: list[Row]) -> list[Job]:
        """The requests for the valid rows."""
        raise NotImplementedError

    def finish(self, job: Job, reply: str) -> list[Any]:
        """Outputs of one reply (examples, or :class:`Reject` for parts of it that fail).

        Raises:
            Rejection: The reply as a whole is unusable.
        """
        raise NotImplementedError

    def read(self, job: Job, result: GenerationResult) -> list[Any]:
        """Outputs of one answered request: those of its first sample that :meth:`finish` accepts."""
        return first_accepted(self._checked_finish if self.checks_language else self.finish, job, result)

    def _checked_finish(self, job: Job, reply: str) -> list[Any]:
        problem = wrong_language(reply, self.templates.lang)
        if problem:
            raise Rejection("wrong language", problem, stage="check")
        return self.finish(job, reply)

    def emit(self, output: Any, provenance: Provenance) -> dict[str, Any]:
        """One output row."""
        assert isinstance(output, Example)
        return format_example(output, self.fmt, provenance)


def positioned(rows: Iterable[Any]) -> list[tuple[int, Any]]:
    """Pairs rows (dicts, or a ``datasets.Dataset``) with their position, the fallback id."""
    return list(enumerate(rows))


def prepare(
    builder: Builder,
    rows: Sequence[tuple[int, Any]],
    *,
    mapping: str | Mapping[str, str] | None = None,
    read_rejects: Sequence[Reject] = (),
) -> Plan:
    """Validates the rows and plans the requests; sends nothing (this is all a dry run does).

    Raises:
        ValueError: ``mapping`` names a field the builder does not read.
    """
    valid, rejects = validate_rows(rows, builder.fields, parse_mapping(mapping, builder.fields))
    jobs = builder.plan(valid)
    return Plan(jobs, [*read_rejects, *rejects], len(rows) + len(read_rejects))


def complete(builder: Builder, plan: Plan, generator: Any, params: SamplingParams | None = None) -> BuildResult:
    """Generates the planned requests (the generator's cache answers what is already done) and builds the output.

    Args:
        builder: The builder that made the plan.
        plan: From :func:`prepare`.
        generator: A ``generation.runner.Generator`` (anything with ``run(requests)``, ``last_stats`` and
            ``backend``).
        params: Sampling settings of every request (default: the builder's ``sampling``).
    """
    outputs, rejects = ask(plan.jobs, generator, builder.read, params or builder.sampling)
    provenance = _provenance(builder.templates, generator)
    rows = [builder.emit(output, provenance) for output in outputs]
    rejects = [*plan.rejects, *rejects]
    stats = BuildStats(plan.rows_in, len(plan.jobs), len(rows), reject_counts(rejects))
    if plan.jobs:
        stats.generation = replace(generator.last_stats)
    return BuildResult(rows, rejects, stats, builder.group_by)


def execute(
    builder: Builder,
    rows: Iterable[Any],
    generator: Any,
    *,
    params: SamplingParams | None = None,
    mapping: str | Mapping[str, str] | None = None,
) -> BuildResult:
    """Runs a builder over in-memory rows (the Python API)."""
    return complete(builder, prepare(builder, positioned(rows), mapping=mapping), generator, params)


def first_accepted(finish: Callable[[Job, str], list[Any]], job: Job, result: GenerationResult) -> list[Any]:
    """The outputs of the first sample that ``finish`` accepts (with ``n > 1`` the others are spares). A sample the
    token limit cut short is rejected: its answer or verdict may be missing, or stated before the reasoning ended."""
    first: Rejection | None = None
    for i, text in enumerate(result.texts):
        try:
            if result.truncated(i):
                raise Rejection("truncated reply", "generation stopped at max_tokens", stage="parse")
            return finish(job, text)
        except Rejection as rejection:
            first = first or rejection
    first = first or Rejection("empty reply", "the backend returned no text", stage="parse")
    return [job.reject(first.stage, first.reason, f"[{job.key}] {first.detail}".strip())]


def _provenance(templates: TemplateSet, generator: Any) -> Provenance:
    backend = getattr(generator, "backend", None)
    return Provenance(
        getattr(backend, "model", None), getattr(backend, "name", None), templates.version, templates.lang
    )
