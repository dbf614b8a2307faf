"""One build from input file to output files: what ``swift-study build`` runs.

Example::

    from swift_callbacks.builders import run_build
    from swift_callbacks.generation.runner import Generator

    with Generator(backend, ".swift_cache/generation") as gen:
        result = run_build("cot", "refs.jsonl", "probe_cot.jsonl", generator=gen)
    print("\\n".join(result.stats.summary_lines()))
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from ..generation.base import SamplingParams
from .io import group_path, read_source, rejects_path, write_jsonl, write_yaml
from .pipeline import Builder, Plan, complete, prepare
from .records import BuildResult, BuildStats, Reject, reject_counts
from .rules import RulesApplyBuilder, RulesExtractBuilder, load_rules, rules_document, slugify
from .strategies import STRATEGY_BUILDERS
from .templating import TemplateSet, load_templates

BUILDER_CLASSES: dict[str, type[Builder]] = {
    **STRATEGY_BUILDERS,
    "rules-extract": RulesExtractBuilder,
    "rules-apply": RulesApplyBuilder,
}
KINDS = tuple(BUILDER_CLASSES)
# Each build's sampling defaults, which command-line sampling options override field by field.
DEFAULT_SAMPLING: dict[str, SamplingParams] = {kind: cls.sampling for kind, cls in BUILDER_CLASSES.items()}


def make_builder(
    kind: str,
    templates: TemplateSet,
    *,
    fmt: str = "prompt-completion",
    rules: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    rule_names: Sequence[str] | None = None,
    seeds_per_request: int = 20,
) -> Builder:
    """The builder of one kind, set up with its templates and (for the rules builds) its rules.

    Raises:
        ValueError: Unknown kind (``RuleError``, a ``ValueError``, for bad rules files or names).
    """
    if kind in STRATEGY_BUILDERS:
        if rules or rule_names:  # silently ignoring them would hide a mistaken command line
            raise ValueError(f"rules and rule names apply to rules-extract and rules-apply, not to {kind!r}")
        return STRATEGY_BUILDERS[kind](templates, fmt=fmt)
    if kind == "rules-extract":
        if rule_names:
            raise ValueError("rule names select rules for rules-apply; rules-extract reads the whole registry")
        return RulesExtractBuilder(templates, registry=load_rules(rules), batch_size=seeds_per_request)
    if kind == "rules-apply":
        return RulesApplyBuilder(templates, rules=load_rules(rules).select(rule_names), fmt=fmt)
    raise ValueError(f"unknown build {kind!r}; choose one of {list(KINDS)}")


def run_build(
    kind: str,
    input: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    generator: Any = None,
    params: SamplingParams | None = None,
    lang: str = "en",
    templates: str | os.PathLike | Mapping | None = None,
    rules: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    rule_names: Sequence[str] | None = None,
    mapping: str | Sequence[str] | Mapping[str, str] | None = None,
    split: str | None = None,
    config: str | None = None,
    fmt: str = "prompt-completion",
    limit: int | None = None,
    seeds_per_request: int = 20,
    dry_run: bool = False,
    stream: IO[str] | None = None,
) -> BuildResult:
    """Reads the input, builds, and writes the outputs and the rejects file atomically at the end.

    Args:
        kind: One of ``KINDS``.
        input: Input file or hub dataset id (see :func:`io.read_source`).
        output: Output path: a JSONL file (``rules-apply``: ``<stem>.<rule>.jsonl`` per rule; ``rules-extract``:
            a rules YAML). Rejects go to ``<stem>.rejects.jsonl``. Not needed for a dry run.
        generator: A ``generation.runner.Generator``; not needed for a dry run.
        params: Sampling settings (default: the builder's, ``DEFAULT_SAMPLING[kind]``).
        lang: Template language.
        templates: Template override file (or mapping).
        rules: Rules files extending the shipped rules (rules builds only).
        rule_names: Only these rules (``rules-apply``).
        mapping: Field -> column mapping, e.g. ``"query=question,response=answer"``.
        split: Hub dataset split.
        config: Hub dataset configuration.
        fmt: Output format (see ``records.FORMATS``).
        limit: Read at most this many input rows.
        seeds_per_request: Seed questions per request (``rules-extract``).
        dry_run: Print the requests that would be sent and stop: nothing is sent or written.
        stream: Where a dry run prints (default stdout).

    Returns:
        The result; ``result.files`` lists what was written.

    Raises:
        ValueError: Bad arguments, templates, rules or mapping (before anything is sent).
        FileNotFoundError: Missing input file.
    """
    template_set = load_templates(lang, templates)
    builder = make_builder(kind, template_set, fmt=fmt, rules=rules, rule_names=rule_names,
                           seeds_per_request=seeds_per_request)  # fmt: skip
    if not dry_run and (generator is None or output is None):
        raise ValueError("a build needs a generator and an output path (or dry_run=True)")
    rows, read_rejects = read_source(input, split=split, config=config, limit=limit)
    plan = prepare(builder, rows, mapping=mapping, read_rejects=read_rejects)
    if dry_run:
        print_plan(plan, stream or sys.stdout)
        return BuildResult([], plan.rejects, _plan_stats(plan), builder.group_by)
    result = complete(builder, plan, generator, params)
    result.files = write_result(builder, result, output, template_set, generator)
    return result


def _plan_stats(plan: Plan) -> BuildStats:
    return BuildStats(plan.rows_in, len(plan.jobs), 0, reject_counts(plan.rejects))


def print_plan(plan: Plan, stream: IO[str]) -> None:
    """Prints every planned request: its key, then each message under its role."""
    for i, job in enumerate(plan.jobs, start=1):
        print(f"===== request {i}/{len(plan.jobs)}: {job.key} =====", file=stream)
        for message in job.messages:
            print(f"[{message['role']}]\n{message['content']}", file=stream)
    print(f"dry run: {len(plan.jobs)} requests planned, nothing sent", file=stream)


def write_result(
    builder: Builder, result: BuildResult, output: str | os.PathLike, templates: TemplateSet, generator: Any
) -> list[str]:
    """Writes the datasets (or rules file) and the rejects file; returns the paths written."""
    files: list[Path] = []
    if builder.kind == "rules-extract":
        backend = getattr(generator, "backend", None)
        provenance = {"generator_model": getattr(backend, "model", None),
                      "generator_backend": getattr(backend, "name", None),
                      "template_version": templates.version, "lang": templates.lang}  # fmt: skip
        name = f"extracted-{Path(output).stem}"
        files.append(write_yaml(output, rules_document(result.rows, name=name, provenance=provenance)))
    elif builder.group_by is None:
        files.append(write_jsonl(output, result.rows))
    else:
        # One file per selected rule, empty when all its rows were rejected: a file left from an earlier run would
        # otherwise stay in place, looking current.
        groups = {rule.name: [] for rule in getattr(builder, "rules", ())} if builder.kind == "rules-apply" else {}
        groups.update(result.outputs())
        for group, rows in groups.items():
            files.append(write_jsonl(group_path(output, slugify(str(group))), rows))
    files.append(write_jsonl(rejects_path(output), (r.to_dict() for r in result.rejects)))
    return [str(f) for f in files]


def summary_lines(result: BuildResult) -> list[str]:
    """The end-of-build report: counts, rejects by reason (with the first example of each), generation counts,
    files written."""
    first: dict[str, Reject] = {}
    for reject in result.rejects:
        first.setdefault(f"{reject.stage}: {reject.reason}", reject)
    examples = [f"  e.g. row {r.source_id!r}: {r.detail}" for r in first.values() if r.detail]
    return [*result.stats.summary_lines(), *examples, *(f"wrote {path}" for path in result.files)]
