"""Example sets: loading, validation, ids and tasks, and tokenization through a preparation function.

A set is given as a ``datasets.Dataset``, a list of dicts, or a path to a JSONL/JSON/Parquet file, in any TRL
dataset format. Every problem is reported with the set name, the example id and the reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

ROW_COLUMN = "__swift_row"
IGNORE_INDEX = -100
# Fields each TRL format needs, checked in this order (the first match decides the format).
FORMATS: dict[str, tuple[str, ...]] = {
    "tokenized": ("input_ids",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "conversations": ("conversations",),
    "text": ("text",),
}
PASSTHROUGH = ("tools", "chat_template_kwargs", "labels", "completion_mask", "assistant_masks")

SetSource = Any  # datasets.Dataset | Sequence[Mapping] | str | os.PathLike


class SetError(UserError):
    """Invalid example set; the message names the set, the example and the reason."""


@dataclass
class ExampleSet:
    """A validated set of examples.

    Attributes:
        name: The name the set was registered under.
        rows: The raw rows (format fields only are used for tokenization).
        ids: One unique string id per row (the row's ``id`` field, or its position).
        tasks: The row's ``task`` field, or None.
        format: The TRL format name (see ``FORMATS``).
        examples: After ``tokenize_set``: ``{"input_ids": [...], "labels": [...]}`` per row.
    """

    name: str
    rows: list[dict]
    ids: list[str]
    tasks: list[str | None]
    format: str
    examples: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def has_tasks(self) -> bool:
        return any(t is not None for t in self.tasks)


def load_set(name: str, source: SetSource) -> ExampleSet:
    """Load and validate one example set.

    Raises:
        SetError: Empty set, unreadable file, unknown or mixed format, wrong field types, missing or duplicate
            ids, or a task on some rows only.
    """
    rows = read_rows(name, source)
    if not rows:
        raise SetError(f"Set {name!r} is empty.")
    ids = example_ids(name, rows)
    formats = {_detect_format(name, ids[i], row) for i, row in enumerate(rows)}
    if len(formats) > 1:
        raise SetError(f"Set {name!r} mixes dataset formats {sorted(formats)}; use one format per set.")
    fmt = formats.pop()
    for i, row in enumerate(rows):
        _check_fields(name, ids[i], row, fmt)
    tasks = [row.get("task") for row in rows]
    for i, task in enumerate(tasks):
        if task is not None and not isinstance(task, str):
            raise SetError(
                f"Set {name!r}, example {ids[i]!r}: field 'task' must be a string, got {type(task).__name__}."
            )
    missing = [ids[i] for i, t in enumerate(tasks) if t is None]
    if missing and len(missing) < len(rows):
        raise SetError(f"Set {name!r}: 'task' is missing on examples {missing[:5]} but present on others.")
    return ExampleSet(name, rows, ids, tasks, fmt)


def read_rows(name: str, source: SetSource) -> list[dict]:
    """The rows of a set given as a file (JSONL, JSON list, Parquet), a ``datasets.Dataset`` or a list of dicts."""
    if isinstance(source, str | os.PathLike):
        return _read_file(name, Path(source))
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # datasets.Dataset
        return [dict(r) for r in source.to_list()]
    if isinstance(source, Sequence) and not isinstance(source, str | bytes):
        for i, row in enumerate(source):
            if not isinstance(row, Mapping):
                raise SetError(f"Set {name!r}, row {i}: expected a dict, got {type(row).__name__}.")
        return [dict(r) for r in source]
    raise SetError(
        f"Set {name!r}: expected a datasets.Dataset, a list of dicts or a file path, got {type(source).__name__}."
    )


def _read_file(name: str, path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix not in {".jsonl", ".json", ".parquet"}:
        raise SetError(f"Set {name!r}: unknown file type {suffix!r} for {str(path)!r}; use .jsonl, .json or .parquet.")
    if not path.exists():
        raise SetError(f"Set {name!r}: file {str(path)!r} does not exist.")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise SetError(
                f"Set {name!r}: cannot read {str(path)!r} as Parquet ({str(err).splitlines()[0]})."
            ) from None
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM some editors write is not part of the data
    except UnicodeDecodeError as err:
        raise SetError(f"Set {name!r}: {str(path)!r} is not valid UTF-8 ({err.reason} at byte {err.start}).") from err
    if suffix == ".json" and text.lstrip().startswith("{") and "\n" in text.strip():
        try:  # one pretty-printed object: a set of one row
            single = json.loads(text)
        except json.JSONDecodeError:
            single = None  # JSON Lines in a .json file: read line by line below
        if isinstance(single, dict):
            return [single]
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise SetError(f"Set {name!r}: {path.name} is not valid JSON ({err.msg}, line {err.lineno}).") from err
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
        if bad is not None:
            raise SetError(f"Set {name!r}: {path.name} item {bad} is not a JSON object.")
        return rows
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SetError(f"Set {name!r}: {path.name} line {line_no} is not valid JSON ({err.msg}).") from err
        if not isinstance(row, dict):
            raise SetError(f"Set {name!r}: {path.name} line {line_no} is not a JSON object.")
        rows.append(row)
    return rows


def example_ids(name: str, rows: list[dict]) -> list[str]:
    """One unique id per row: its ``id`` field, else its position (all rows or none must have one)."""
    given = ["id" in row and row["id"] is not None for row in rows]
    if not any(given):
        return [str(i) for i in range(len(rows))]
    if not all(given):
        raise SetError(f"Set {name!r}: field 'id' is missing on rows {[i for i, g in enumerate(given) if not g][:5]}.")
    ids = [str(row["id"]) for row in rows]
    seen: set[str] = set()
    dups = sorted({i for i in ids if i in seen or seen.add(i)})
    if dups:
        raise SetError(f"Set {name!r}: duplicate example ids {dups[:5]}.")
    return ids


def _detect_format(name: str, example_id: str, row: Mapping) -> str:
    for fmt, keys in FORMATS.items():
        if all(k in row for k in keys):
            return fmt
    raise SetError(
        f"Set {name!r}, example {example_id!r}: unknown format (fields {sorted(row)}); expected one of "
        "'prompt'+'completion', 'messages', 'conversations', 'text' or 'input_ids'."
    )


def _check_fields(name: str, example_id: str, row: Mapping, fmt: str) -> None:
    def fail(reason: str) -> None:
        raise SetError(f"Set {name!r}, example {example_id!r}: {reason}")

    if fmt == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) != isinstance(completion, str):
            fail("'prompt' and 'completion' must both be strings or both be lists of messages.")
        if isinstance(prompt, str):
            if not completion.strip():
                fail("field 'completion' is empty.")
        else:
            _check_messages(fail, prompt, "prompt")
            _check_messages(fail, completion, "completion")
            if not completion:
                fail("field 'completion' has no message.")
    elif fmt in {"messages", "conversations"}:
        _check_messages(fail, row[fmt], fmt, sharegpt=fmt == "conversations")
        if not row[fmt]:
            fail(f"field {fmt!r} is empty.")
    elif fmt == "text":
        if not isinstance(row["text"], str) or not row["text"].strip():
            fail("field 'text' must be a non-empty string.")
    elif fmt == "tokenized":
        ids = row["input_ids"]
        if not isinstance(ids, Sequence) or not ids or not all(isinstance(t, int) for t in ids):
            fail("field 'input_ids' must be a non-empty list of ints.")


def _check_messages(fail: Callable[[str], None], messages: Any, field_name: str, sharegpt: bool = False) -> None:
    role, content = ("from", "value") if sharegpt else ("role", "content")
    if not isinstance(messages, list):
        fail(f"field {field_name!r} must be a list of messages, got {type(messages).__name__}.")
    for k, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or role not in msg or content not in msg:
            fail(f"message {k} of field {field_name!r} needs {role!r} and {content!r} keys.")
        if not isinstance(msg[role], str):
            fail(f"message {k} of field {field_name!r}: {role!r} must be a string, got {msg[role]!r}.")
        if not isinstance(msg[content], str | list):  # text, or a list of content parts
            fail(f"message {k} of field {field_name!r}: {content!r} must be text, got {msg[content]!r}.")


def check_unique_names(*groups: Mapping[str, Any]) -> None:
    """Raise if a set name appears in more than one group (e.g. both a probe and an evaluation set)."""
    seen: set[str] = set()
    for group in groups:
        for name in group:
            if name in seen:
                raise SetError(f"Set name {name!r} is used twice; every probe and evaluation set needs its own name.")
            seen.add(name)


def tokenize_set(example_set: ExampleSet, prepare: Callable[[Any], Any], vocab_size: int | None = None) -> None:
    """Tokenize ``example_set`` with ``prepare`` (a ``datasets.Dataset -> Dataset`` function producing
    ``input_ids`` and ``labels``, e.g. the trainer's own dataset preparation) and store the result.

    Raises:
        SetError: If preparation dropped a row (for TRL: no trainable token left after truncation), left an
            example with no supervised token, or produced labels / token ids that do not fit (length, range).
    """
    from datasets import Dataset
    from datasets.utils import logging as ds_logging

    keep = FORMATS[example_set.format] + PASSTHROUGH
    records = [{**{k: row[k] for k in keep if k in row}, ROW_COLUMN: i} for i, row in enumerate(example_set.rows)]
    bars_were_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # one bar per preparation stage per set is noise in a training log
    try:
        prepared = prepare(Dataset.from_list(records))
    finally:
        if bars_were_on:
            ds_logging.enable_progress_bar()
    out: list[dict | None] = [None] * len(example_set)
    for rec in prepared:
        out[rec[ROW_COLUMN]] = {
            "input_ids": list(rec["input_ids"]),
            "labels": list(rec.get("labels") or rec["input_ids"]),
        }
    dropped = [example_set.ids[i] for i, ex in enumerate(out) if ex is None]
    if dropped:
        raise SetError(
            f"Set {example_set.name!r}: examples {dropped[:10]} have no completion tokens left after tokenization "
            "and truncation (max_length), so their loss is undefined; shorten them or raise max_length."
        )
    for i, ex in enumerate(out):
        _check_tokens(example_set.name, example_set.ids[i], ex, vocab_size)
        if not any(label != IGNORE_INDEX for label in ex["labels"][1:]):
            raise SetError(
                f"Set {example_set.name!r}, example {example_set.ids[i]!r}: no supervised token (all labels are "
                "-100 after the one-token shift); the example contributes no loss."
            )
    example_set.examples = out


def _check_tokens(name: str, example_id: str, ex: dict, vocab_size: int | None) -> None:
    ids, labels = ex["input_ids"], ex["labels"]
    where = f"Set {name!r}, example {example_id!r}"
    if len(labels) != len(ids):
        raise SetError(f"{where}: 'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}.")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in (*ids, *labels)):
        raise SetError(f"{where}: 'input_ids' and 'labels' must hold ints.")
    limit = vocab_size if vocab_size is not None else float("inf")
    bad = [t for t in ids if not 0 <= t < limit] + [t for t in labels if t != IGNORE_INDEX and not 0 <= t < limit]
    if bad:
        raise SetError(f"{where}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size}).")
