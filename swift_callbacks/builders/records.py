"""What a build produces: examples in TRL formats with provenance, rejects with reasons, and counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

# TRL dataset formats a build can write. "prompt-completion": strings (TRL's standard format);
# "conversational": prompt and completion as message lists; "messages": one chat with both turns.
FORMATS = ("prompt-completion", "conversational", "messages")
# TRL joins a string prompt and completion with nothing between them, so the completion carries the separator
# (the same convention as the demo sets). Chinese text has no spaces between words; chat formats need none, the
# chat template separates the turns.
COMPLETION_SEPARATOR = {"en": " ", "zh": ""}


@dataclass
class Reject:
    """A row, request or reply that did not make it into the output.

    Attributes:
        source_id: Id of the input row (its ``id`` field, or its position in the input).
        stage: ``"read"``, ``"validate"``, ``"generate"``, ``"parse"`` or ``"check"``.
        reason: Short fixed category, counted in the summary.
        row: The input row (or what could be read of it).
        detail: Specifics: the offending value, the reply excerpt, the backend error.
    """

    source_id: str
    stage: str
    reason: str
    row: Any
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"source_id": self.source_id, "stage": self.stage, "reason": self.reason, "detail": self.detail,
                "row": self.row}  # fmt: skip


@dataclass
class Example:
    """One generated SFT example before it is put in a TRL format.

    Attributes:
        id: Unique id, derived from the source id and the strategy or rule.
        prompt: The user turn.
        completion: The assistant turn.
        task: Task label used for in-task/cross-task pairing, or None.
        columns: Builder-specific columns (``source_id``, ``strategy`` or ``rule``, ``kind``, ``label``, ...).
    """

    id: str
    prompt: str
    completion: str
    task: str | None
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Provenance:
    """Where the examples of a build came from; written into every row."""

    generator_model: str | None
    generator_backend: str | None
    template_version: str
    lang: str


def format_example(example: Example, fmt: str, provenance: Provenance) -> dict[str, Any]:
    """Turns an example into one output row of TRL format ``fmt`` with its provenance columns.

    Raises:
        ValueError: Unknown format.
    """
    if fmt == "prompt-completion":
        separator = COMPLETION_SEPARATOR.get(provenance.lang, " ")
        body = {"prompt": example.prompt, "completion": separator + example.completion}
    elif fmt == "conversational":
        body = {"prompt": [{"role": "user", "content": example.prompt}],
                "completion": [{"role": "assistant", "content": example.completion}]}  # fmt: skip
    elif fmt == "messages":
        body = {"messages": [{"role": "user", "content": example.prompt},
                             {"role": "assistant", "content": example.completion}]}  # fmt: skip
    else:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {list(FORMATS)}")
    return {"id": example.id, "task": example.task, **body, **example.columns, **asdict(provenance)}


def reject_counts(rejects: Iterable[Reject]) -> Counter:
    """Rejects counted by ``"<stage>: <reason>"``, the key every summary and stats file uses."""
    return Counter(f"{r.stage}: {r.reason}" for r in rejects)


@dataclass
class BuildStats:
    """Counts of one build, and the base of every stage's stats (``scalequest.contract.StageStats`` adds the
    stage's name, unit, metrics, settings and fingerprint).

    Attributes:
        rows_in: Input rows read (unreadable ones included).
        requests: Generation requests planned.
        rows_out: Output rows written.
        rejects: Reject count by ``"stage: reason"`` (see :func:`reject_counts`).
        generation: The generator's counts for this build (``RunStats``), or None (dry run, nothing to send); a
            stage's are JSON-ready counts by model role.
    """

    rows_in: int = 0
    requests: int = 0
    rows_out: int = 0
    rejects: Counter = field(default_factory=Counter)
    generation: Any = None

    def summary_lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        lines = [f"rows in: {self.rows_in}", f"requests: {self.requests}", f"rows out: {self.rows_out}",
                 f"rejects: {sum(self.rejects.values())}"]  # fmt: skip
        lines += [f"  {count:6d}  {reason}" for reason, count in self.rejects.most_common()]
        if self.generation is not None:
            lines.append(f"generation: {self.generation.summary()}")
        return lines


@dataclass
class BuildResult:
    """Output of a build or of a ScaleQuest stage.

    Attributes:
        rows: Output rows in the requested TRL format (for ``rules-extract``: rules in registry form; for a stage:
            the rows it kept).
        rejects: Everything that was dropped, with reasons.
        stats: Counts (a stage's :class:`~.scalequest.contract.StageStats`).
        group_by: Column that splits ``rows`` into separate datasets (``"rule"`` for ``rules-apply``), or None.
        files: Paths written (by ``run_build`` or a stage; empty for the builders' Python API and dry runs).
    """

    rows: list[dict[str, Any]]
    rejects: list[Reject]
    stats: BuildStats
    group_by: str | None = None
    files: list[str] = field(default_factory=list)

    def outputs(self) -> dict[str | None, list[dict[str, Any]]]:
        """The datasets of the build: ``{None: rows}``, or one list per value of ``group_by``."""
        if self.group_by is None:
            return {None: self.rows}
        groups: dict[str | None, list[dict[str, Any]]] = {}
        for row in self.rows:
            groups.setdefault(row[self.group_by], []).append(row)
        return groups

    def to_dataset(self, group: str | None = None):
        """The rows (or one group's rows) as a ``datasets.Dataset``."""
        from datasets import Dataset  # imported here: datasets is slow to import and the CLI rarely needs it

        rows = self.rows if group is None else self.outputs()[group]
        return Dataset.from_list(rows)
