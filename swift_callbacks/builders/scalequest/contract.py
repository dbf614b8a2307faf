"""The data-in/data-out contract every ScaleQuest stage keeps.

A stage reads one JSONL file (or nothing, for the stages that sample from a model) and writes, atomically:

- ``<output>``: the rows it keeps (a JSONL file, or a model folder for the training stages);
- ``<output stem>.rejects.jsonl``: every row it dropped, with the step, the reason and details;
- ``<output stem>.stats.json``: counts (rows in, rows out, drops by reason), the stage's own metrics, the
  generation counts, the settings, and a fingerprint of everything the result depends on. It is written last,
  so its presence with a matching fingerprint is what marks the stage as complete.

Generation goes through :class:`~swift_callbacks.generation.Generator`, whose SQLite cache keeps every answer the
moment it arrives: a stage killed half way reruns from the start but sends only the requests it has no answer for,
and since outputs are only ever written whole, no row is duplicated or lost.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from ...configuration import ConfigError
from ...generation.base import Message, SamplingParams, folder_digest
from ..io import read_source, rejects_path, write_json, write_jsonl
from ..pipeline import Job, ask, failed_request
from ..records import BuildResult, BuildStats, Reject, reject_counts
from .metrics import ratio

STATS_SUFFIX = ".stats.json"


class StageError(RuntimeError):
    """A stage cannot run: missing input, nothing to train on, a backend that cannot do what the stage needs."""


def stats_path(output: str | os.PathLike) -> Path:
    """``out/generate.jsonl`` -> ``out/generate.stats.json``; ``out/qft`` (a folder) -> ``out/qft.stats.json``."""
    path = Path(output)
    stem = path.stem if path.suffix.lower() == ".jsonl" else path.name
    return path.with_name(stem + STATS_SUFFIX)


@dataclass
class StageStats(BuildStats):
    """What one stage did, as written to ``<output stem>.stats.json``: a build's counts plus the stage's own.

    Attributes:
        rows_in: Units read (unreadable input lines included) or requested.
        rows_out: Units written.
        rejects: Dropped units by ``"<step>: <reason>"``; their sum is ``rows_in - rows_out`` (``dropped`` in
            the file).
        generation: The generator's counts (requests, cached, sent, failed, tokens), by role.
        stage: Stage name (``"filter-solvable"``).
        unit: What ``rows_in`` and ``rows_out`` count (``"questions"``, ``"samples"``, ``"examples"``, ...).
        metrics: Stage-specific numbers (ratios, histograms, distributions).
        settings: The settings the stage ran with.
        fingerprint: Hash of the inputs, settings and models; equal fingerprints mean an equal result.
        seconds: Wall-clock time.
        outputs: Paths written.
        complete: Always True in a written file (a stage that fails writes no stats).

    The file also holds ``kept_ratio`` (``rows_out / rows_in``, None when nothing came in) and ``dropped_ratio``
    (each reason's share of ``rows_in``).
    """

    generation: Any = field(default_factory=dict)
    stage: str = ""
    unit: str = "rows"
    metrics: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    complete: bool = True

    @property
    def dropped(self) -> dict[str, int]:
        return dict(sorted(self.rejects.items()))

    @property
    def dropped_total(self) -> int:
        return sum(self.rejects.values())

    @property
    def kept_ratio(self) -> float | None:
        return ratio(self.rows_out, self.rows_in)

    @property
    def dropped_ratio(self) -> dict[str, float]:
        return {reason: count / self.rows_in for reason, count in self.dropped.items() if self.rows_in}

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "unit": self.unit, "rows_in": self.rows_in, "rows_out": self.rows_out,
                "dropped": self.dropped, "kept_ratio": self.kept_ratio, "dropped_ratio": self.dropped_ratio,
                **{name: copy.deepcopy(getattr(self, name)) for name in _STAGE_FIELDS}}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageStats:
        known = {"stage", "unit", "rows_in", "rows_out", *_STAGE_FIELDS}
        return cls(rejects=Counter(data.get("dropped") or {}), **{k: v for k, v in data.items() if k in known})

    def summary_lines(self) -> list[str]:
        """A human-readable summary, one fact per line."""
        kept = "-" if self.kept_ratio is None else f"{self.kept_ratio:.1%}"
        lines = [f"[{self.stage}] {self.rows_in} {self.unit} in, {self.rows_out} out ({kept} kept), "
                 f"{self.dropped_total} dropped ({self.seconds:.1f} s)"]  # fmt: skip
        lines += [f"  dropped {count:6d} ({self.dropped_ratio.get(reason, 0):6.1%})  {reason}"
                  for reason, count in self.dropped.items()]  # fmt: skip
        lines += [f"  {key}: {_short(value)}" for key, value in self.metrics.items()]
        lines += [f"  generation ({role}): {_short(counts)}" for role, counts in self.generation.items()]
        lines += [f"  wrote {path}" for path in self.outputs.values()]
        return lines


_STAGE_FIELDS = ("metrics", "generation", "settings", "fingerprint", "seconds", "outputs", "complete")
# A stage's result is a build's: the rows it kept, its rejects and its stats.
StageResult = BuildResult


def _short(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list) and len(value) > 12:
        return json.dumps(value[:12])[:-1] + ", ...]"
    return json.dumps(value) if isinstance(value, list) else str(value)


# ------------------------------------------------------------------------------------------------ reading rows


def read_rows(
    path: str | os.PathLike, required: Sequence[str] = (), *, id_field: str = "id"
) -> tuple[list[dict[str, Any]], list[Reject], int]:
    """Reads a stage's input rows and gives each a string ``id``.

    A row keeps its ``id`` when it has one, else gets its position in the file. Unreadable lines, rows that are
    not objects, rows whose ``required`` fields are missing or not non-empty strings, and rows repeating an
    earlier id become rejects (step ``read`` or ``validate``); nothing is dropped without one.

    Args:
        path: A JSONL/JSON/CSV/Parquet file (see :func:`swift_callbacks.builders.io.read_source`).
        required: Fields that must hold text. An empty string counts as present here; stages that need text
            check emptiness themselves, with their own reason.
        id_field: Column holding the row id.

    Returns:
        ``(rows, rejects, rows_read)`` where ``rows_read`` counts every input line, bad ones included.

    Raises:
        StageError: If the input file does not exist.
    """
    if not Path(path).is_file():
        what = "is a folder, not a file" if Path(path).is_dir() else "does not exist"
        raise ConfigError(f"input file {str(path)!r} {what}")
    source, rejects = read_source(path)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for position, raw in source:
        row_id = str(raw.get(id_field, position)) if isinstance(raw, dict) else str(position)
        problem = _row_problem(raw, required, row_id, seen)
        if problem is not None:
            rejects.append(Reject(row_id, "validate", problem[0], raw, problem[1]))
            continue
        seen.add(row_id)
        rows.append({**raw, id_field: row_id})
    return rows, rejects, len(source) + sum(1 for r in rejects if r.stage == "read")


def _row_problem(raw: Any, required: Sequence[str], row_id: str, seen: set[str]) -> tuple[str, str] | None:
    if not isinstance(raw, dict):
        return "not an object", f"got {type(raw).__name__}"
    if row_id in seen:
        return "duplicate id", f"id {row_id!r} appeared earlier in the input"
    for name in required:
        if name not in raw or raw[name] is None:
            return f"missing field {name!r}", f"columns: {sorted(raw)}"
        if not isinstance(raw[name], str):
            return f"field {name!r} is not text", f"got {type(raw[name]).__name__}"
    return None


# ------------------------------------------------------------------------------------------------ writing


def finish(
    output: str | os.PathLike,
    rows: Iterable[dict[str, Any]] | None,
    rejects: Sequence[Reject],
    stats: StageStats,
    *,
    started: float,
    stream: IO[str] | None = None,
) -> StageResult:
    """Writes a stage's outputs (rows, rejects, then stats) atomically and prints the summary.

    Args:
        output: The output path (a JSONL file; for training stages the model folder, already written).
        rows: Rows to write to ``output``, or None when the stage wrote its output itself.
        rejects: Dropped rows.
        stats: The stats; ``rejects``, ``seconds`` and ``outputs`` are filled in here.
        started: ``time.perf_counter()`` at the start of the stage.
        stream: Where to print the summary (default stdout).

    Returns:
        The result.
    """
    rows = list(rows) if rows is not None else []
    stats.rejects = reject_counts(rejects)
    outputs = {"output": str(output), "rejects": str(rejects_path(output)), "stats": str(stats_path(output))}
    if Path(output).suffix.lower() == ".jsonl":
        write_jsonl(output, rows)
    write_jsonl(rejects_path(output), (r.to_dict() for r in rejects))
    stats.outputs = outputs
    stats.seconds = round(time.perf_counter() - started, 3)
    write_json(stats_path(output), stats.to_dict())
    print("\n".join(stats.summary_lines()), file=stream or sys.stdout, flush=True)
    return BuildResult(rows, list(rejects), stats, files=list(outputs.values()))


def load_stats(output: str | os.PathLike) -> StageStats | None:
    """The stats of a finished stage, or None when there are none (or they cannot be read)."""
    path = stats_path(output)
    try:
        return StageStats.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def is_complete(output: str | os.PathLike, fingerprint: str) -> bool:
    """Whether ``output`` holds a finished run of the stage with this fingerprint (so it can be skipped).

    A run in which generation requests failed (a server down, a timeout) is not complete: rerunning it re-asks
    only the failed requests, since the generation cache answers the rest.
    """
    stats = load_stats(output)
    return (
        stats is not None
        and stats.complete
        and stats.fingerprint == fingerprint
        and not generation_failed(stats)
        and Path(output).exists()
        and rejects_path(output).exists()
    )


def generation_failed(stats: StageStats) -> int:
    """How many generation requests or rows failed in a stage run (0 when none did)."""
    failed = 0
    for counts in (stats.generation or {}).values():
        if isinstance(counts, Mapping):
            value = counts.get("failed", 0)
            failed += value if isinstance(value, int) else 0
    failed += sum(
        count
        for reason, count in (stats.dropped or {}).items()
        if reason.startswith("generate:") and "failed" in reason
    )
    return failed


# ------------------------------------------------------------------------------------------------ fingerprints


def fingerprint(stage: str, settings: Any, inputs: Sequence[str | os.PathLike] = (), models: Sequence[str] = ()) -> str:
    """A hash of everything a stage's result depends on.

    Args:
        stage: Stage name.
        settings: The stage settings (a dataclass or JSON-able value).
        inputs: Input files (hashed by content) or folders made by an earlier stage (by that stage's fingerprint).
        models: Model identities (see :func:`models.ModelSpec.identity`).

    Returns:
        A hex digest.
    """
    payload = {
        "stage": stage,
        "settings": dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else settings,
        "inputs": [path_digest(p) for p in inputs],
        "models": list(models),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def path_digest(path: str | os.PathLike) -> str:
    """Content hash of a file; for a folder, the fingerprint of the stage that made it, else a listing hash."""
    path = Path(path)
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    if path.is_dir():
        stats = load_stats(path)
        if stats is not None and stats.fingerprint:
            return f"stage:{stats.fingerprint}"
        # A folder from elsewhere (a model): known by its content, cheap even for large weights.
        return folder_digest(path)
    return f"missing:{path}"


def score_rows(
    rows: Sequence[dict[str, Any]],
    scorer: Any,
    messages: Callable[[dict[str, Any]], list[Message]],
    column: str,
    invalid: tuple[str, str] = ("parse", "score is not a number"),
) -> tuple[list[dict[str, Any]], list[Reject]]:
    """Scores every row (a scoring backend answers each request with a number).

    Args:
        rows: Rows with a string ``id``.
        scorer: A Generator whose backend returns scores.
        messages: The conversation that is scored, of one row.
        column: The column the score is written to.
        invalid: Step and reason of a reply that is not a finite number.

    Returns:
        The rows with a finite score (with ``column`` set), and the rejects of the others (a failed request is
        ``generate: scoring failed``).
    """

    def read(job: Job, result: Any) -> list[Any]:
        try:
            value = float(result.texts[0])
        except (ValueError, IndexError):
            value = math.nan
        if not math.isfinite(value):
            return [job.reject(*invalid, repr(result.texts[:1]))]
        return [{**job.raw, column: value}]

    jobs = [Job(row["id"], row["id"], row, messages(row)) for row in rows]
    return ask(jobs, scorer, read, SamplingParams(), failed=partial(failed_request, reason="scoring failed"))


def generation_counts(generator: Any) -> dict[str, Any]:
    """The counts of everything a generator ran (JSON-ready)."""
    stats = getattr(generator, "stats", None)
    return dataclasses.asdict(stats) if stats is not None and dataclasses.is_dataclass(stats) else {}
