"""Per-example evaluation records on disk: the cache that makes an evaluation resumable.

One JSONL file per (model, set, settings): a first line with the fingerprint of everything that decides a result
(the model's content, the set file's content, the metric's settings, the judge and its prompt version), then one
line per evaluated example, appended and flushed batch by batch. A rerun reads what is there and evaluates only
the rest; other settings get another file. A line cut short by a kill (the last one) is dropped and redone; a
damaged line elsewhere, or a header that does not match its file name, is refused with the file's name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError


class RecordError(UserError):
    """A damaged evaluation record file; the message names it."""


@dataclass
class ExampleRecord:
    """The outcome of one example.

    Attributes:
        id: The example id.
        task: Its task.
        correct: True / False; None when it could not be decided (the judge gave no verdict or failed).
        prediction: The final answer read from the output (``choice``: the chosen letter); None if none.
        gold: The golden answer.
        output: The model's generation (empty for ``choice``).
        truncated: The generation hit the token cap before ending.
        detail: Why ``correct`` is None, or the option log-likelihoods of a ``choice`` example.
    """

    id: str
    task: str
    correct: bool | None
    prediction: str | None
    gold: str
    output: str = ""
    truncated: bool = False
    detail: Any = None


def fingerprint(parts: Mapping[str, Any]) -> str:
    """A short stable hash of the settings that decide the results."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _well_typed(record: ExampleRecord) -> bool:
    """The fields a table is computed from have the types this module writes (a hand-edited "correct": "no" is not
    counted as anything)."""
    return (
        isinstance(record.id, str) and isinstance(record.task, str) and isinstance(record.truncated, bool)
        and (record.correct is None or isinstance(record.correct, bool))
    )  # fmt: skip


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RecordFile:
    """The records of one model on one set under one fingerprint.

    Args:
        path: The JSONL file.
        header: The settings the fingerprint was made from (written as the first line).
    """

    def __init__(self, path: Path, header: Mapping[str, Any]) -> None:
        self.path = path
        self.header = dict(header)
        self.records: dict[str, ExampleRecord] = {}
        if path.exists():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        parts = data.split(b"\n")
        keep = 0  # bytes of the file made of complete, valid lines
        for number, line in enumerate(parts, start=1):
            if number == len(parts):  # after the last newline: empty, or a line a kill cut short (redone)
                break
            try:
                item = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RecordError(
                    f"{self.path}: line {number} is damaged; delete the file to evaluate its examples again"
                ) from None
            if number == 1:
                if not isinstance(item, dict) or item.get("header") != json.loads(json.dumps(self.header, default=str)):
                    raise RecordError(f"{self.path}: its header does not match its settings; delete the file")
            else:
                try:
                    record = ExampleRecord(**item)
                except TypeError:
                    record = None
                if record is None or not _well_typed(record):
                    raise RecordError(f"{self.path}: line {number} is not a record; delete the file") from None
                self.records[record.id] = record
            keep += len(line) + 1
        if keep < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)

    def missing(self, ids: Iterable[str]) -> list[str]:
        """The ids without a record yet, in the given order."""
        return [i for i in ids if i not in self.records]

    def append(self, records: list[ExampleRecord]) -> None:
        """Adds records durably (flushed and fsynced before returning)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "ab") as f:
            if new:
                f.write(_line({"header": self.header}))
            for record in records:
                f.write(_line(asdict(record)))
                self.records[record.id] = record
            f.flush()
            os.fsync(f.fileno())


def _line(item: Mapping[str, Any]) -> bytes:
    return (json.dumps(item, ensure_ascii=False, default=str) + "\n").encode("utf-8")
