"""The swift-study data strategies: CoT, query clarification, response evaluation, and similar examples.

Each builder takes reference examples (``query``, ``response``, optional ``task`` and ``id``) and asks the
generator for one thing per item; what comes back is parsed strictly and checked before it becomes an example.

Example::

    from swift_callbacks.builders import build_cot
    from swift_callbacks.generation.runner import Generator

    result = build_cot(rows, Generator(backend, ".swift_cache/generation"))
    result.to_dataset()  # TRL prompt-completion rows with provenance columns
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from ..generation.base import SamplingParams
from .parsing import Rejection, clean_reply, ends_with_answer, normalize, parse_labeled_pair, parse_list, parse_verdict
from .parsing import short_final_answer as short_final_answer
from .pipeline import Builder, Job, execute
from .records import BuildResult, Example
from .schema import EVALUATE_FIELDS, STRATEGY_FIELDS, Row
from .templating import TemplateSet, load_templates

TemplatesArg = TemplateSet | str | os.PathLike | Mapping | None


def resolve_templates(lang: str, templates: TemplatesArg) -> TemplateSet:
    """A ready template set, or the shipped ones of ``lang`` with ``templates`` (file or mapping) as override."""
    return templates if isinstance(templates, TemplateSet) else load_templates(lang, templates)


def _example(row: Row, suffix: str, prompt: str, completion: str, **columns: Any) -> Example:
    return Example(f"{row.source_id}/{suffix}", prompt, completion, row.get("task"),
                   {"source_id": row.source_id, **columns})  # fmt: skip


def with_directive(query: str, directive: str) -> str:
    """``query`` followed by the CoT directive; a query without closing punctuation gets a full stop first ("。"
    before a directive that starts without a space, as Chinese text does), so the two do not run together."""
    query = query.rstrip()
    if query and query[-1] not in _CLOSING:
        query += "." if directive[:1].isspace() else "。"
    return query + directive


_CLOSING = frozenset(".?!。？！…:：;；)\"'”’」』）")


def _reply_text(reply: str) -> str:
    text = clean_reply(reply)
    if not text:
        raise Rejection("empty reply", "the reply has no text", stage="parse")
    return text


class CotBuilder(Builder):
    """CoT: the query gains the reason-first directive; the generator writes a reasoning-first response that
    must agree with the reference (checked when the reference is a short final answer)."""

    kind, fields = "cot", STRATEGY_FIELDS
    checks_language = True

    def plan(self, rows: list[Row]) -> list[Job]:
        directive = self.templates.text("cot", "directive")
        jobs = []
        for row in rows:
            query = with_directive(row.get("query"), directive)
            messages = self.templates.messages("cot", query=query, response=row.get("response"))
            jobs.append(Job(f"{row.source_id}/cot", row.source_id, row.raw, messages, {"row": row, "query": query}))
        return jobs

    def finish(self, job: Job, reply: str) -> list[Any]:
        row, text = job.context["row"], _reply_text(reply)
        reference = row.get("response")
        answer = short_final_answer(reference)
        if answer is not None and not ends_with_answer(text, answer):
            raise Rejection("answer mismatch", f"expected the reply to end with {answer!r}; it ends {text[-120:]!r}")
        if normalize(text) == normalize(reference):
            raise Rejection("no reasoning", "the reply only repeats the reference response")
        return [_example(row, "cot", job.context["query"], text, strategy="cot")]


class ClarifyBuilder(Builder):
    """Query clarification: the generator lists the query's requirements; the clarified query is the query
    followed by them. Each row gives a clarification example (rephrase request -> clarified query) and a
    positive example (clarified query -> reference response), marked by the ``kind`` column."""

    kind, fields = "clarify", STRATEGY_FIELDS
    checks_language = True
    sampling = SamplingParams(temperature=0.0, max_tokens=512)

    def plan(self, rows: list[Row]) -> list[Job]:
        return [Job(f"{row.source_id}/clarify", row.source_id, row.raw,
                    self.templates.messages("clarify", query=row.get("query")), {"row": row})
                for row in rows]  # fmt: skip

    def finish(self, job: Job, reply: str) -> list[Any]:
        row = job.context["row"]
        requirements = parse_list(reply)
        listed = "\n".join(f"{i}. {item}" for i, item in enumerate(requirements, start=1))
        query = row.get("query").strip()
        clarified = self.templates.render("clarify", "clarified", query=query, requirements=listed)
        rephrase = self.templates.render("clarify", "rephrase", query=query)
        return [
            _example(row, "clarify/clarification", rephrase, clarified, strategy="clarify", kind="clarification"),
            _example(row, "clarify/positive", clarified, row.get("response"), strategy="clarify", kind="positive"),
        ]


class EvaluateBuilder(Builder):
    """Response evaluation: for each (query, response, label) the generator writes a judgement that lists the
    query's requirements, checks the response against them and ends with a verdict sentence. The verdict is read
    strictly from the final sentence and must agree with the label.

    Labels come from a ``label`` column (pos/neg) for ``response``, and ``negative_response`` (if given) is a
    negative; without a ``label`` column ``response`` is positive.
    """

    kind, fields = "evaluate", EVALUATE_FIELDS
    checks_language = True

    def plan(self, rows: list[Row]) -> list[Job]:
        jobs = []
        for row in rows:
            cases = [("evaluate", row.get("response"), row.get("label", "pos"))]
            if row.get("negative_response") is not None:
                cases.append(("evaluate/negative", row.get("negative_response"), "neg"))
            for suffix, output, label in cases:
                verdict = self.templates.phrases("evaluate", "verdict_pass" if label == "pos" else "verdict_fail")[0]
                messages = self.templates.messages("evaluate", query=row.get("query"), output=output, verdict=verdict)
                context = {"row": row, "suffix": suffix, "output": output, "label": label}
                jobs.append(Job(f"{row.source_id}/{suffix}", row.source_id, row.raw, messages, context))
        return jobs

    def finish(self, job: Job, reply: str) -> list[Any]:
        row, label, output = job.context["row"], job.context["label"], job.context["output"]
        text = _reply_text(reply)
        passed = parse_verdict(text, self.templates.phrases("evaluate", "verdict_pass"),
                               self.templates.phrases("evaluate", "verdict_fail"))  # fmt: skip
        if passed != (label == "pos"):
            verdict = "meets" if passed else "does not meet"
            raise Rejection("verdict contradicts label", f"label {label!r} but the judgement says the output {verdict}")
        prompt = self.templates.render("evaluate", "prompt", query=row.get("query"), output=output)
        return [_example(row, job.context["suffix"], prompt, text, strategy="evaluate", label=label)]


class SimilarBuilder(Builder):
    """Similar examples (Z' from Z): a new query and response of the same task, parsed from a two-label reply
    and rejected when the query merely repeats the source."""

    kind, fields = "similar", STRATEGY_FIELDS
    checks_language = True
    sampling = SamplingParams(temperature=0.7, max_tokens=1024)  # variety is the point of a similar example

    def plan(self, rows: list[Row]) -> list[Job]:
        return [Job(f"{row.source_id}/similar", row.source_id, row.raw,
                    self.templates.messages("similar", query=row.get("query"), response=row.get("response")),
                    {"row": row}) for row in rows]  # fmt: skip

    def finish(self, job: Job, reply: str) -> list[Any]:
        row = job.context["row"]
        labels = self.templates.text("similar", "query_label"), self.templates.text("similar", "response_label")
        query, response = parse_labeled_pair(reply, *labels)
        if normalize(query) == normalize(row.get("query")):
            raise Rejection("identical to source", "the new query repeats the reference query")
        return [_example(row, "similar", query, response, strategy="similar")]


STRATEGY_BUILDERS: dict[str, type[Builder]] = {
    "cot": CotBuilder,
    "clarify": ClarifyBuilder,
    "evaluate": EvaluateBuilder,
    "similar": SimilarBuilder,
}


def build_strategy(
    kind: str,
    rows: Iterable[Mapping[str, Any]],
    generator: Any,
    *,
    lang: str = "en",
    templates: TemplatesArg = None,
    params: SamplingParams | None = None,
    fmt: str = "prompt-completion",
    mapping: str | Mapping[str, str] | None = None,
) -> BuildResult:
    """Runs one strategy over in-memory rows.

    Args:
        kind: ``"cot"``, ``"clarify"``, ``"evaluate"`` or ``"similar"``.
        rows: Reference examples (dicts or a ``datasets.Dataset``) with ``query``, ``response``, optional
            ``task``, ``id`` (and for evaluate ``negative_response``, ``label``), or other columns via ``mapping``.
        generator: A ``generation.runner.Generator``.
        lang: Template language.
        templates: A :class:`TemplateSet`, or an override file/mapping for the shipped templates.
        params: Sampling settings.
        fmt: Output format (see ``records.FORMATS``).
        mapping: Field -> column.

    Returns:
        The examples, the rejects with reasons, and counts.
    """
    builder = STRATEGY_BUILDERS[kind](resolve_templates(lang, templates), fmt=fmt)
    return execute(builder, rows, generator, params=params, mapping=mapping)


def build_cot(
    rows: Iterable[Mapping[str, Any]],
    generator: Any,
    *,
    lang: str = "en",
    templates: TemplatesArg = None,
    params: SamplingParams | None = None,
    fmt: str = "prompt-completion",
    mapping: str | Mapping[str, str] | None = None,
) -> BuildResult:
    """CoT examples (query + directive -> reasoning-first response); see :func:`build_strategy`."""
    return build_strategy(
        "cot", rows, generator, lang=lang, templates=templates, params=params, fmt=fmt, mapping=mapping
    )


def build_clarify(
    rows: Iterable[Mapping[str, Any]],
    generator: Any,
    *,
    lang: str = "en",
    templates: TemplatesArg = None,
    params: SamplingParams | None = None,
    fmt: str = "prompt-completion",
    mapping: str | Mapping[str, str] | None = None,
) -> BuildResult:
    """Clarification and positive examples; see :func:`build_strategy`."""
    return build_strategy(
        "clarify", rows, generator, lang=lang, templates=templates, params=params, fmt=fmt, mapping=mapping
    )


def build_evaluate(
    rows: Iterable[Mapping[str, Any]],
    generator: Any,
    *,
    lang: str = "en",
    templates: TemplatesArg = None,
    params: SamplingParams | None = None,
    fmt: str = "prompt-completion",
    mapping: str | Mapping[str, str] | None = None,
) -> BuildResult:
    """Response-evaluation examples; see :func:`build_strategy`."""
    return build_strategy(
        "evaluate", rows, generator, lang=lang, templates=templates, params=params, fmt=fmt, mapping=mapping
    )


def build_similar(
    rows: Iterable[Mapping[str, Any]],
    generator: Any,
    *,
    lang: str = "en",
    templates: TemplatesArg = None,
    params: SamplingParams | None = None,
    fmt: str = "prompt-completion",
    mapping: str | Mapping[str, str] | None = None,
) -> BuildResult:
    """Similar examples of the same tasks; see :func:`build_strategy`."""
    return build_strategy(
        "similar", rows, generator, lang=lang, templates=templates, params=params, fmt=fmt, mapping=mapping
    )
