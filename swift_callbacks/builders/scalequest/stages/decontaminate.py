"""Decontamination: drop rows that share a 13-token run with an evaluation set.

Texts are compared as normalized tokens: Unicode NFKC, lower case, every character that is not a letter or a
digit (in any script) replaced by a space, then split on whitespace (so ``"3+4=7"`` is ``3 4 7`` and
``"\\frac{1}{2}"`` is ``frac 1 2``). A row is contaminated by an evaluation text when

- both have at least ``n`` tokens and share an ``n``-gram (a run of ``n`` consecutive tokens); or
- either has fewer than ``n`` tokens (it has no ``n``-gram) and their token sequences are identical.

Texts with no tokens never match. A row is checked field by field (``fields``, default the question).

Example::

    settings = DecontaminateSettings(eval_sets=[EvalSet("data/gsm8k_test.jsonl", fields=["question"])])
    decontaminate("best.jsonl", "final.jsonl", settings=settings)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ....configuration import ConfigError, resolve_local
from ...io import read_source
from ...parsing import is_cjk
from ...records import Reject
from ..contract import StageError, StageResult, StageStats, finish, read_rows
from ..contract import fingerprint as make_fingerprint
from ..metrics import ratio
from ..settings import settings_dict
from .base import Stage, StageRun


def normalized_tokens(text: str) -> list[str]:
    """The tokens decontamination compares (see the module docstring); CJK characters are one token each."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join((f" {c} " if is_cjk(c) else c) if c.isalnum() else " " for c in text).split()


def ngrams(tokens: list[str], n: int) -> Iterator[tuple[str, ...]]:
    """The ``n``-grams of ``tokens`` (none when there are fewer than ``n`` tokens)."""
    return (tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


@dataclass(frozen=True)
class EvalSet:
    """An evaluation set to decontaminate against.

    Attributes:
        path: A JSONL/JSON/CSV/Parquet file.
        fields: Its text columns (e.g. ``["question"]``, or ``["problem"]`` for MATH).
        name: Name in the stats and rejects (default: the file stem).
    """

    path: str
    fields: list[str] = field(default_factory=lambda: ["question"])
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


@dataclass(frozen=True)
class DecontaminateSettings:
    """Settings of ``decontaminate``.

    Attributes:
        n: The n-gram length (the paper's 13).
        fields: Columns of the rows to check.
        eval_sets: The evaluation sets.
    """

    n: int = 13
    fields: list[str] = field(default_factory=lambda: ["question"])
    eval_sets: list[EvalSet] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")


class ContaminationIndex:
    """The n-grams and short texts of the evaluation sets, for fast lookup.

    Args:
        n: The n-gram length.
    """

    def __init__(self, n: int = 13) -> None:
        self.n = n
        self.grams: dict[tuple[str, ...], tuple[str, str]] = {}
        self.whole: dict[tuple[str, ...], tuple[str, str]] = {}
        self.sizes: dict[str, int] = {}
        self.unreadable: dict[str, int] = {}

    def add(self, set_name: str, item_id: str, text: str) -> None:
        """Indexes one evaluation text (the first source of a given n-gram is the one reported)."""
        tokens = normalized_tokens(text)
        if not tokens:
            return
        self.whole.setdefault(tuple(tokens), (set_name, item_id))
        for gram in ngrams(tokens, self.n):
            self.grams.setdefault(gram, (set_name, item_id))

    def match(self, text: str) -> tuple[str, str, str] | None:
        """The first evaluation item ``text`` is contaminated by: ``(set name, item id, matched text)``, or None."""
        tokens = normalized_tokens(text)
        if not tokens:
            return None
        hit = self.whole.get(tuple(tokens))
        if hit is not None:
            return (*hit, " ".join(tokens))
        for gram in ngrams(tokens, self.n):
            hit = self.grams.get(gram)
            if hit is not None:
                return (*hit, " ".join(gram))
        return None


def build_index(eval_sets: Iterable[EvalSet], n: int) -> ContaminationIndex:
    """Reads the evaluation sets into an index.

    Raises:
        StageError: A missing file, or a set none of whose rows has any of its fields as text.
    """
    index = ContaminationIndex(n)
    eval_sets = list(eval_sets)
    for spec, label in zip(eval_sets, eval_set_labels(eval_sets), strict=True):
        if not Path(spec.path).is_file():
            raise ConfigError(f"evaluation set {spec.path!r} does not exist")
        # Items are known by their position in the file: ids may be missing, null or repeated across splits,
        # and every item must be indexed whatever its id.
        source, bad = read_source(spec.path)
        rows = [(position, raw) for position, raw in source if isinstance(raw, dict)]
        texts = 0
        for position, row in rows:
            item_id = row.get("id")
            item = f"#{position}" if item_id is None else str(item_id)  # a name for the reports only
            for name in spec.fields:
                if isinstance(row.get(name), str):
                    index.add(label, item, row[name])
                    texts += 1
        if not texts:
            raise StageError(f"evaluation set {spec.path!r} has no text in fields {spec.fields}")
        index.sizes[label] = len(rows)
        # Reported in the stats: an unindexed item can hide contamination.
        index.unreadable[label] = len(bad) + len(source) - len(rows)
    return index


def eval_set_labels(eval_sets: Iterable[EvalSet]) -> list[str]:
    """A unique name per evaluation set: its ``name``, else its file stem, else ``<folder>/<stem>`` where stems
    repeat (``gsm8k/test`` and ``math/test``).

    Raises:
        StageError: Two sets that still share a name (give them distinct ``name`` values).
    """
    eval_sets = list(eval_sets)
    stems = [spec.label for spec in eval_sets]
    labels = []
    for spec, stem in zip(eval_sets, stems, strict=True):
        if spec.name is None and stems.count(stem) > 1:
            path = Path(spec.path)
            stem = f"{path.parent.name}/{path.stem}" if path.parent.name else stem
        labels.append(stem)
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise StageError(f"evaluation sets share the name(s) {repeated}; give each a distinct 'name'")
    return labels


def decontaminate(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    settings: DecontaminateSettings,
    fingerprint: str | None = None,
) -> StageResult:
    """The ``decontaminate`` stage: drops rows contaminated by any evaluation set.

    A dropped row's reject names the evaluation set (reason ``contaminated: <set>``) and gives the evaluation item
    id and the matched tokens in the detail. Rows with none of ``fields`` as text are kept and counted
    (``rows_without_checked_text``), as are evaluation lines that could not be read (``eval_rows_unreadable``).

    Args:
        input: Input JSONL.
        output: Output JSONL.
        settings: Stage settings (the evaluation sets among them).
        fingerprint: The run's fingerprint (computed when None).

    Returns:
        The stage result; ``metrics.contamination_ratio`` is contaminated rows / rows read.

    Raises:
        StageError: No evaluation sets, or an unreadable one.
    """
    started = time.perf_counter()
    if not settings.eval_sets:
        raise StageError("decontaminate needs at least one evaluation set")
    index = build_index(settings.eval_sets, settings.n)
    rows, rejects, rows_in = read_rows(input)
    kept, by_set = [], dict.fromkeys(index.sizes, 0)
    unchecked = sum(1 for row in rows if not any(isinstance(row.get(f), str) for f in settings.fields))
    for row in rows:
        hit = _first_hit(row, settings.fields, index)
        if hit is None:
            kept.append(row)
            continue
        field_name, (set_name, item_id, matched) = hit
        by_set[set_name] += 1
        detail = f"field {field_name!r} matches {set_name} item {item_id!r} on: {matched[:300]!r}"
        rejects.append(Reject(row["id"], "filter", f"contaminated: {set_name}", row, detail))
    contaminated = sum(by_set.values())
    stats = StageStats(
        stage="decontaminate", unit="rows", rows_in=rows_in, rows_out=len(kept),
        metrics={"n": settings.n, "contaminated": contaminated, "contamination_ratio": ratio(contaminated, rows_in),
                 "contaminated_by_set": by_set, "eval_set_rows": index.sizes, "eval_rows_unreadable": index.unreadable,
                 "eval_ngrams": len(index.grams), "rows_without_checked_text": unchecked},
        settings=settings_dict(settings),
        fingerprint=fingerprint or make_fingerprint("decontaminate", settings,
                                                    [input, *(s.path for s in settings.eval_sets)]),
    )  # fmt: skip
    return finish(output, kept, rejects, stats, started=started)


def _first_hit(row: dict[str, Any], fields: list[str], index: ContaminationIndex) -> tuple[str, Any] | None:
    for name in fields:
        value = row.get(name)
        if isinstance(value, str):
            hit = index.match(value)
            if hit is not None:
                return name, hit
    return None


class Decontaminate(Stage):
    name = "decontaminate"
    settings = DecontaminateSettings
    input_from = "reward-select"
    help = "drop rows sharing a 13-gram with an evaluation set"
    headline_metric = "contamination_ratio"

    def resolve_paths(self, settings: DecontaminateSettings, base: Path, path: str) -> DecontaminateSettings:
        if not settings.eval_sets:
            raise ConfigError(f"{path}.eval_sets: at least one evaluation set is required")
        eval_sets = [
            dataclasses.replace(
                s, path=str(resolve_local(s.path, base, f"{path}.eval_sets[{i}].path", must_exist=False))
            )
            for i, s in enumerate(settings.eval_sets)
        ]
        return dataclasses.replace(settings, eval_sets=eval_sets)

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--eval", action="append", default=[], metavar="PATH[:FIELD,...]",
                           help="evaluation set and its text fields (default: question); repeatable")  # fmt: skip

    def apply_arguments(self, args: argparse.Namespace, data: dict[str, Any]) -> None:
        if args.eval:
            data["eval_sets"] = [_eval_set(item) for item in args.eval]

    def run(self, run: StageRun, stack: ExitStack) -> StageResult:
        return decontaminate(run.input, run.output, settings=run.settings, fingerprint=run.fingerprint)


def _eval_set(item: str) -> dict[str, Any]:
    # "PATH:FIELDS" splits at the last colon only when what follows looks like field names (Windows drive letters
    # and paths with colons stay whole).
    path, sep, fields = item.rpartition(":")
    if sep and fields and all(f.strip().isidentifier() for f in fields.split(",")) and path:
        return {"path": path, "fields": [f.strip() for f in fields.split(",")]}
    return {"path": item}
