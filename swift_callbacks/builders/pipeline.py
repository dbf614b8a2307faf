"""The loop every builder shares: validate rows, plan one request per item, generate, parse, check, format.

A builder only says how to turn rows into requests (:meth:`Builder.plan`) and a reply into outputs
(:meth:`Builder.finish`); everything about caching, failures, rejects, provenance and counting lives here once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..generation.base import GenerationRequest, Message, SamplingParams
from .parsing import Rejection
from .records import FORMATS, BuildResult, BuildStats, Example, Provenance, Reject, format_example
from .schema import Field, Row, parse_mapping, validate_rows
from .templating import TemplateSet


@dataclass
class Job:
    """One generation request and what is needed to turn its reply into outputs.

    Attributes:
        key: Unique request key, e.g. ``"<source id>/cot"``.
        source_id: Id written into rejects (a row's id, or a batch name).
        raw: Input written into rejects.
        messages: The chat messages to send.
        context: Builder-specific data for :meth:`Builder.finish` (e.g. the row).
    """

    key: str
    source_id: str
    raw: Any
    messages: list[Message]
    context: dict[str, Any] = field(default_factory=dict)

    def request(self, params: SamplingParams | None) -> GenerationRequest:
        return GenerationRequest.chat(self.key, self.messages, params)


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
    rejects = list(plan.rejects)
    rows: list[dict[str, Any]] = []
    requests = [job.request(params or builder.sampling) for job in plan.jobs]
    results = generator.run(requests) if requests else {}
    provenance = _provenance(builder.templates, generator)
    for job in plan.jobs:
        result = results[job.key]
        if not result.ok:
            detail = f"[{job.key}] {result.error}"
            rejects.append(Reject(job.source_id, "generate", "generation failed", job.raw, detail))
            continue
        for output in _first_accepted(builder, job, result.texts, result.finish_reasons):
            if isinstance(output, Reject):
                rejects.append(output)
            else:
                rows.append(builder.emit(output, provenance))
    stats = BuildStats(plan.rows_in, len(plan.jobs), len(rows), Counter(f"{r.stage}: {r.reason}" for r in rejects))
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


def _first_accepted(
    builder: Builder, job: Job, texts: list[str], finish_reasons: Sequence[str | None] = ()
) -> list[Any]:
    """The outputs of the first sample that passes (with ``n > 1`` the others are spares). A sample the token
    limit cut short is rejected: its answer or verdict may be missing, or stated before the reasoning ended."""
    first: Rejection | None = None
    for i, text in enumerate(texts):
        try:
            if i < len(finish_reasons) and finish_reasons[i] == "length":
                raise Rejection("truncated reply", "generation stopped at max_tokens", stage="parse")
            return builder.finish(job, text)
        except Rejection as rejection:
            first = first or rejection
    first = first or Rejection("empty reply", "the backend returned no text", stage="parse")
    return [Reject(job.source_id, first.stage, first.reason, job.raw, f"[{job.key}] {first.detail}".strip())]


def _provenance(templates: TemplateSet, generator: Any) -> Provenance:
    backend = getattr(generator, "backend", None)
    return Provenance(
        getattr(backend, "model", None), getattr(backend, "name", None), templates.version, templates.lang
    )
