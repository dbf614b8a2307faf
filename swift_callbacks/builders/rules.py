"""Question-rewriting rules ("silly question" rules): the registry, rule extraction and rule application.

* The registry holds rules as data (``rules/default.yaml`` plus user files); a rule is a name, a description and
  an instruction for rewriting a question by it.
* ``rules-extract`` has the generator analyse seed questions (e.g. Ruozhiba questions) from education, psychology
  and cognitive-science viewpoints and propose new rules in registry form.
* ``rules-apply`` rewrites every question of a multiple-choice set by each rule, keeping choices and answer, and
  makes one SFT dataset per rule (completion: the correct choice), keeping ``subject`` as ``task``.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from ..errors import UserError
from ..generation.base import SamplingParams
from .parsing import Rejection, contains_phrase, normalize, numbers, parse_structured, strip_answer_text
from .pipeline import Builder, Job, execute
from .records import BuildResult, Example, Provenance, Reject
from .schema import CHOICE_FIELDS, LETTERS, SEED_FIELDS, Row
from .strategies import TemplatesArg, resolve_templates

RULE_FIELDS = ("name", "description", "rewrite")
_OPTIONAL_RULE_FIELDS = ("source", "override")
_FILE_KEYS = ("version", "name", "rules", "provenance")
_BLANK = re.compile(r"_{2,}")
_STATEMENT = re.compile(r"\bstatement\s*\d+", re.IGNORECASE)
RulePaths = str | os.PathLike | Sequence[str | os.PathLike] | None
# Labels a rewrite reply sometimes starts with, though asked for the bare question.
_REWRITE_LABELS = ("Rewritten question", "Rewritten", "Question", "改写后的问题", "问题")


class RuleError(UserError):
    """A malformed rules file or rule, a duplicate name, or an unknown rule name."""


@dataclass(frozen=True)
class Rule:
    """One rewriting rule.

    Attributes:
        name: Display name, unique after :func:`rule_key` normalization.
        description: What marks a question following the rule.
        rewrite: How to rewrite a question by the rule without changing its answer.
        source: Where the rule came from (e.g. the extraction run), if recorded.
    """

    name: str
    description: str
    rewrite: str
    source: str | None = None

    @property
    def key(self) -> str:
        return rule_key(self.name)

    @property
    def slug(self) -> str:
        """File-name-safe id used in example ids and per-rule output files."""
        return slugify(self.name)

    def block(self) -> str:
        """The rule as given to the generator (the ``{rule}`` placeholder)."""
        return f"{self.name}: {self.description}\n{self.rewrite}"

    def to_dict(self) -> dict[str, str]:
        data = {"name": self.name, "description": self.description, "rewrite": self.rewrite}
        return {**data, "source": self.source} if self.source else data


def rule_key(name: str) -> str:
    """Normalized name used for duplicate detection: case, spacing and punctuation ignored."""
    text = unicodedata.normalize("NFKC", name).casefold()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def slugify(name: str) -> str:
    """``"Humor in Social Commentary"`` -> ``"humor-in-social-commentary"``."""
    return rule_key(name).replace(" ", "-") or "rule"


def parse_rule(entry: Any, where: str = "rule") -> tuple[Rule, bool]:
    """Checks one rule entry and returns it with its ``override`` flag.

    Raises:
        RuleError: Not a mapping, unknown keys, or a missing/empty/non-string field.
    """
    if not isinstance(entry, Mapping):
        raise RuleError(f"{where}: expected a mapping with {list(RULE_FIELDS)}, got {type(entry).__name__}")
    unknown = set(entry) - set(RULE_FIELDS) - set(_OPTIONAL_RULE_FIELDS)
    if unknown:
        allowed = [*RULE_FIELDS, *_OPTIONAL_RULE_FIELDS]
        raise RuleError(f"{where}: unknown keys {sorted(map(str, unknown))}; allowed: {allowed}")
    for key in RULE_FIELDS:
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise RuleError(f"{where}: {key!r} must be a non-empty string")
    if entry.get("source") is not None and not isinstance(entry["source"], str):
        raise RuleError(f"{where}: 'source' must be a string")
    if not isinstance(entry.get("override", False), bool):
        raise RuleError(f"{where}: 'override' must be true or false")
    fields = {key: " ".join(entry[key].split()) for key in RULE_FIELDS}
    return Rule(**fields, source=entry.get("source")), entry.get("override", False)


class RuleRegistry:
    """Rules by normalized name, in the order they were added."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self._rules: dict[str, Rule] = {}
        for rule in rules:
            self.add(rule)

    def add(self, rule: Rule, *, override: bool = False, where: str = "") -> None:
        """Adds a rule.

        Raises:
            RuleError: The name exists and ``override`` is false, or ``override`` is true for a new name
                (likely a misspelt name).
        """
        prefix = f"{where}: " if where else ""
        if rule.key in self._rules and not override:
            raise RuleError(f"{prefix}rule {rule.name!r} is already defined (as {self._rules[rule.key].name!r}); "
                            "set 'override: true' on it to replace it")  # fmt: skip
        if override and rule.key not in self._rules:
            raise RuleError(f"{prefix}rule {rule.name!r} has 'override: true' but there is no rule of that name")
        self._rules[rule.key] = rule

    def __iter__(self):
        return iter(self._rules.values())

    def __len__(self) -> int:
        return len(self._rules)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and rule_key(name) in self._rules

    def names(self) -> list[str]:
        return [rule.name for rule in self]

    def select(self, names: Sequence[str] | None = None) -> list[Rule]:
        """The named rules (all when ``names`` is None).

        Raises:
            RuleError: An unknown name.
        """
        if not names:
            return list(self)
        unknown = [name for name in names if name not in self]
        if unknown:
            raise RuleError(f"unknown rules {unknown}; known: {self.names()}")
        return [self._rules[rule_key(name)] for name in names]


def load_rules(paths: RulePaths = None, *, defaults: bool = True) -> RuleRegistry:
    """The shipped rules (unless ``defaults`` is false) extended by user files, in order.

    Raises:
        RuleError: Unreadable or malformed file, or a duplicate name without ``override: true``.
    """
    registry = RuleRegistry()
    if defaults:
        text = resources.files(__package__).joinpath("rules", "default.yaml").read_text("utf-8")
        _extend(registry, yaml.safe_load(text), "rules/default.yaml")
    if paths is None:
        paths = []
    elif isinstance(paths, str | os.PathLike):
        paths = [paths]
    for path in paths:
        _extend(registry, _read_yaml(path), str(path))
    return registry


def _read_yaml(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except OSError as err:
        raise RuleError(f"cannot read rules file {str(path)!r}: {err}") from err
    except yaml.YAMLError as err:
        raise RuleError(f"rules file {str(path)!r} is not valid YAML: {err}") from err


def _extend(registry: RuleRegistry, data: Any, where: str) -> None:
    if not isinstance(data, Mapping) or not isinstance(data.get("rules"), list):
        raise RuleError(f"{where}: expected a mapping with a 'rules' list")
    unknown = set(data) - set(_FILE_KEYS)
    if unknown:
        raise RuleError(f"{where}: unknown top-level keys {sorted(map(str, unknown))}; allowed: {list(_FILE_KEYS)}")
    seen: set[str] = set()
    for i, entry in enumerate(data["rules"]):
        rule, override = parse_rule(entry, f"{where}: rules[{i}]")
        if rule.key in seen:
            raise RuleError(f"{where}: rule {rule.name!r} appears twice in the file")
        seen.add(rule.key)
        registry.add(rule, override=override, where=where)


def rules_document(
    rules: Iterable[Mapping[str, Any]], *, name: str, provenance: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A rules file (as written by ``rules-extract``) that :func:`load_rules` reads back."""
    doc: dict[str, Any] = {"version": 1, "name": name}
    if provenance:
        doc["provenance"] = dict(provenance)
    doc["rules"] = [dict(rule) for rule in rules]
    return doc


def resolve_rules(rules: RuleRegistry | RulePaths) -> RuleRegistry:
    """A registry as given, or the defaults extended by the given file(s)."""
    return rules if isinstance(rules, RuleRegistry) else load_rules(rules)


class RulesExtractBuilder(Builder):
    """Asks the generator to derive rules from batches of seed questions; keeps new, well-formed rules whose
    normalized name is not yet in the registry or earlier in the run."""

    kind, fields = "rules-extract", SEED_FIELDS
    sampling = SamplingParams(temperature=0.7, max_tokens=2048)  # several rules per reply, some creativity

    def __init__(self, templates, *, registry: RuleRegistry | None = None, batch_size: int = 20, **kwargs) -> None:
        super().__init__(templates, **kwargs)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.registry = registry if registry is not None else load_rules()
        self.batch_size = batch_size
        self._seen = {rule.key for rule in self.registry}

    def plan(self, rows: list[Row]) -> list[Job]:
        known = ", ".join(self.registry.names()) or "(none)"
        jobs = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            questions = "\n".join(f"{i}. {' '.join(row.get('text').split())}" for i, row in enumerate(batch, 1))
            ids = [row.source_id for row in batch]
            name = f"batch-{start // self.batch_size}"
            messages = self.templates.messages("rules-extract", questions=questions, known_rules=known)
            jobs.append(Job(f"rules-extract/{name}", name, {"ids": ids}, messages, {"ids": ids}))
        return jobs

    def finish(self, job: Job, reply: str) -> list[Any]:
        data = parse_structured(reply)
        if isinstance(data, Mapping) and set(data) == {"rules"}:
            data = data["rules"]
        if not isinstance(data, list) or not data:
            raise Rejection("malformed reply", f"expected a non-empty list of rules, got {type(data).__name__}",
                            stage="parse")  # fmt: skip
        outputs: list[Any] = []
        for i, entry in enumerate(data):
            outputs.append(self._accept(job, i, entry))
        return outputs

    def _accept(self, job: Job, index: int, entry: Any) -> _Extracted | Reject:
        try:
            rule, _ = parse_rule(entry, f"item {index}")
        except RuleError as err:
            return Reject(job.source_id, "check", "bad rule", entry, f"[{job.key}] {err}")
        if rule.key in self._seen:
            return Reject(job.source_id, "check", "duplicate rule", entry, f"[{job.key}] {rule.name!r} already known")
        self._seen.add(rule.key)
        return _Extracted(rule, job.context["ids"])

    def emit(self, output: Any, provenance: Provenance) -> dict[str, Any]:
        seeds = output.seed_ids
        shown = ", ".join(seeds[:5]) + (f" and {len(seeds) - 5} more" if len(seeds) > 5 else "")
        made_by = f"{provenance.generator_backend}:{provenance.generator_model}"
        source = f"rules-extract ({made_by}) from seed questions {shown}"
        return Rule(output.rule.name, output.rule.description, output.rule.rewrite, source).to_dict()


@dataclass(frozen=True)
class _Extracted:
    """A new rule and the seed questions it was derived from."""

    rule: Rule
    seed_ids: list[str]


class RulesApplyBuilder(Builder):
    """Rewrites each multiple-choice question by each rule; the prompt is the rewritten question with the
    lettered choices, the completion the correct choice (``"B. <text>"``). One dataset per rule."""

    kind, fields, group_by = "rules-apply", CHOICE_FIELDS, "rule"
    sampling = SamplingParams(temperature=0.0, max_tokens=512)

    def __init__(self, templates, *, rules: Sequence[Rule], **kwargs) -> None:
        super().__init__(templates, **kwargs)
        if not rules:
            raise RuleError("rules-apply needs at least one rule")
        self.rules = list(rules)

    def plan(self, rows: list[Row]) -> list[Job]:
        jobs = []
        for row in rows:
            choices = format_choices(row.get("choices"))
            for rule in self.rules:
                messages = self.templates.messages("rules-apply", query=row.get("question"), rule=rule.block(),
                                                   choices=choices)  # fmt: skip
                context = {"row": row, "rule": rule, "choices": choices}
                jobs.append(Job(f"{row.source_id}/rule/{rule.slug}", row.source_id, row.raw, messages, context))
        return jobs

    def finish(self, job: Job, reply: str) -> list[Any]:
        row, rule = job.context["row"], job.context["rule"]
        question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
        rewrite = strip_answer_text(reply, _REWRITE_LABELS)
        check_rewrite(question, rewrite, choices, answer)
        prompt = self.templates.render("rules-apply", "prompt", query=rewrite, choices=job.context["choices"])
        columns = {"source_id": row.source_id, "rule": rule.name, "answer": LETTERS[answer],
                   "original_question": question}  # fmt: skip
        example_id = f"{row.source_id}/rule/{rule.slug}"
        return [Example(example_id, prompt, f"{LETTERS[answer]}. {choices[answer]}", row.get("subject"), columns)]


def format_choices(choices: Sequence[str]) -> str:
    """``["x", "y"]`` -> ``"A. x\\nB. y"``."""
    return "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))


def check_rewrite(original: str, rewrite: str, choices: Sequence[str], answer: int) -> None:
    """Checks that a rewritten question is still the same answerable question.

    Rejected: an empty or unchanged rewrite; one that newly names the correct choice while naming no other choice
    (it gives the answer away; naming all options, as in "true or false", does not); one that drops a blank
    (``___``), a "Statement N" label or a number of the original (without them the question cannot be answered).

    Raises:
        Rejection: With reason ``"empty rewrite"``, ``"unchanged rewrite"``, ``"answer leaked"`` or
            ``"dropped structure"``.
    """
    if not rewrite.strip():
        raise Rejection("empty rewrite", "the reply holds no question", stage="parse")
    if normalize(rewrite) == normalize(original):
        raise Rejection("unchanged rewrite", "the rewrite is the original question")
    if _newly_named(original, rewrite, choices[answer]) and not any(
        _newly_named(original, rewrite, c) for i, c in enumerate(choices) if i != answer
    ):
        raise Rejection("answer leaked", f"the rewrite names the correct choice {choices[answer]!r}")
    missing = _missing_structure(original, rewrite)
    if missing:
        raise Rejection("dropped structure", f"the rewrite lacks {missing}")


def _newly_named(original: str, rewrite: str, choice: str) -> bool:
    return contains_phrase(rewrite, choice) and not contains_phrase(original, choice)


def _missing_structure(original: str, rewrite: str) -> list[str]:
    missing = []
    if len(_BLANK.findall(rewrite)) < len(_BLANK.findall(original)):
        missing.append("a blank (___)")
    labels = {normalize(m) for m in _STATEMENT.findall(original)} - {normalize(m) for m in _STATEMENT.findall(rewrite)}
    missing += sorted(f"label {label!r}" for label in labels)
    kept = set(numbers(rewrite))
    missing += [f"number {n!r}" for n in dict.fromkeys(numbers(original)) if n not in kept]
    return missing


def build_rules_extract(
    rows: Iterable[Mapping[str, Any]],
    generator: Any,
    *,
    rules: RuleRegistry | RulePaths = None,
    batch_size: int = 20,
    lang: str = "en",
    templates: TemplatesArg = None,
    params: SamplingParams | None = None,
    mapping: str | Mapping[str, str] | None = None,
) -> BuildResult:
    """Derives new rules from seed questions (rows with a ``text`` field, or another column via ``mapping``).

    Returns:
        A result whose rows are the new rules in registry form (write them with :func:`rules_document`).
    """
    builder = RulesExtractBuilder(resolve_templates(lang, templates), registry=resolve_rules(rules),
                                  batch_size=batch_size)  # fmt: skip
    return execute(builder, rows, generator, params=params, mapping=mapping)


def build_rules_apply(
    rows: Iterable[Mapping[str, Any]],
    generator: Any,
    *,
    rules: RuleRegistry | RulePaths = None,
    rule_names: Sequence[str] | None = None,
    lang: str = "en",
    templates: TemplatesArg = None,
    params: SamplingParams | None = None,
    fmt: str = "prompt-completion",
    mapping: str | Mapping[str, str] | None = None,
) -> BuildResult:
    """Rewrites a multiple-choice set (``question``, ``choices``, ``answer`` index or letter, optional
    ``subject``) by each rule.

    Returns:
        A result grouped by rule: ``result.outputs()`` gives one dataset per rule name.
    """
    selected = resolve_rules(rules).select(rule_names)
    builder = RulesApplyBuilder(resolve_templates(lang, templates), rules=selected, fmt=fmt)
    return execute(builder, rows, generator, params=params, mapping=mapping)
