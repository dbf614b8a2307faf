"""Reading build inputs (JSONL, JSON, CSV/TSV, Parquet, hub datasets) and writing outputs atomically.

Inputs are read row by row so that one bad line (invalid UTF-8, invalid JSON) becomes a reject instead of
stopping the build. Outputs are written to a temporary file and renamed into place, so a reader never sees half
a file; the generation cache, not the output file, is what keeps a crashed build's finished work.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from ..files import write_atomic
from .records import Reject

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
_BOM = b"\xef\xbb\xbf"
_CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)
SourceRows = list[tuple[int, Any]]  # (position in the input, row as read)


def read_source(
    source: str | os.PathLike, *, split: str | None = None, config: str | None = None, limit: int | None = None
) -> tuple[SourceRows, list[Reject]]:
    """Reads the rows of a local file or a hub dataset.

    Args:
        source: A ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` path, or a dataset id for
            ``datasets.load_dataset`` (anything that is not an existing path and has no file suffix).
        split: Dataset split (hub datasets only; default ``"train"``).
        config: Dataset configuration name (hub datasets only).
        limit: Read at most this many rows.

    Returns:
        ``(position, row)`` pairs and a reject for each line that could not be read.

    Raises:
        FileNotFoundError: A path with a file suffix that does not exist.
        ValueError: A file suffix this reader does not know, or a JSON array file that is not valid UTF-8/JSON.
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix not in FILE_SUFFIXES:
            raise ValueError(f"unknown input file type {suffix!r} for {str(path)!r}; use one of {FILE_SUFFIXES}")
        return _READERS[suffix](path, limit)
    if path.is_dir():
        raise FileNotFoundError(f"input {str(path)!r} is a folder; give a .jsonl/.json/.csv/.tsv/.parquet file")
    if suffix in FILE_SUFFIXES:
        raise FileNotFoundError(f"input file {str(path)!r} does not exist")
    return _read_hub(str(source), split, config, limit), []


def _read_jsonl(path: Path, limit: int | None) -> tuple[SourceRows, list[Reject]]:
    rows: SourceRows = []
    rejects: list[Reject] = []
    position = 0
    # A UTF-8 byte order mark (Windows tools write one) would make the first line invalid JSON.
    for line_no, raw in enumerate(path.read_bytes().removeprefix(_BOM).split(b"\n"), start=1):
        if limit is not None and position >= limit:
            break
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            bad = {"line": line_no, "text": raw.decode("utf-8", "backslashreplace")}
            rejects.append(Reject(str(position), "read", "invalid UTF-8", bad, f"{err.reason} at byte {err.start}"))
        except json.JSONDecodeError as err:
            bad = {"line": line_no, "text": raw.decode("utf-8")}
            rejects.append(Reject(str(position), "read", "invalid JSON", bad, err.msg))
        else:
            rows.append((position, row))
        position += 1
    return rows, rejects


def _read_json(path: Path, limit: int | None) -> tuple[SourceRows, list[Reject]]:
    head = path.read_bytes()[:4096].removeprefix(_BOM).lstrip()
    if not head.startswith(b"["):
        return _read_jsonl(path, limit)  # a .json file holding JSON lines
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{str(path)!r} is not a valid UTF-8 JSON array ({err}); use JSON lines to skip bad rows"
        ) from err
    return list(enumerate(data[:limit] if limit is not None else data)), []


def _read_csv(path: Path, limit: int | None) -> tuple[SourceRows, list[Reject]]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so the CSV reader still sees quoted multi-line
    # cells whole, and each record with bad bytes can be rejected on its own.
    text = path.read_bytes().decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows: SourceRows = []
    rejects: list[Reject] = []
    reader = csv.DictReader(_io.StringIO(text, newline=""), delimiter=delimiter)
    previous_limit = csv.field_size_limit(_CSV_FIELD_LIMIT)  # the default 128 KiB is less than a long document
    try:
        for position, record in enumerate(_csv_records(reader, path)):
            if limit is not None and position >= limit:
                break
            _add_csv_record(rows, rejects, position, record, reader.line_num)
    finally:
        csv.field_size_limit(previous_limit)
    return rows, rejects


def _csv_records(reader: csv.DictReader, path: Path) -> Iterator[dict | Reject]:
    """The records of a CSV reader; a record the reader cannot parse (a NUL byte) comes as a reject."""
    while True:
        line = reader.line_num
        try:
            record: dict | Reject = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            if reader.line_num == line:  # no progress: the rest of the file cannot be read
                raise ValueError(f"{str(path)!r}: unreadable CSV near line {line + 1}: {err}") from err
            record = Reject("", "read", "invalid CSV", {"line": reader.line_num}, f"line {reader.line_num}: {err}")
        yield record


def _add_csv_record(rows: SourceRows, rejects: list[Reject], position: int, record: Any, line: int) -> None:
    if isinstance(record, Reject):
        rejects.append(Reject(str(position), record.stage, record.reason, record.row, record.detail))
        return
    if _has_surrogates(record):
        bad = {"line": line, "row": {str(k): _printable(v) for k, v in record.items()}}
        detail = f"undecodable bytes near line {line}"
        rejects.append(Reject(str(position), "read", "invalid UTF-8", bad, detail))
    else:
        rows.append((position, record))


def _has_surrogates(record: dict) -> bool:
    return any(isinstance(v, str) and _printable(v) != v for v in [*record.keys(), *record.values()])


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def _read_parquet(path: Path, limit: int | None) -> tuple[SourceRows, list[Reject]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if limit is not None:
        table = table.slice(0, limit)
    return list(enumerate(table.to_pylist())), []


def _read_hub(name: str, split: str | None, config: str | None, limit: int | None) -> SourceRows:
    from datasets import load_dataset

    dataset = load_dataset(name, config, split=split or "train")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return list(enumerate(dataset))


_READERS: dict[str, Callable[[Path, int | None], tuple[SourceRows, list[Reject]]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".tsv": _read_csv,
    ".parquet": _read_parquet,
}


def rejects_path(output: str | os.PathLike) -> Path:
    """``out.jsonl`` -> ``out.rejects.jsonl``."""
    path = Path(output)
    return path.with_name(f"{_stem(path)}.rejects.jsonl")


def group_path(output: str | os.PathLike, group: str) -> Path:
    """One dataset of a grouped build: ``out.jsonl`` and group ``exaggeration`` -> ``out.exaggeration.jsonl``."""
    path = Path(output)
    return path.with_name(f"{_stem(path)}.{group}{path.suffix or '.jsonl'}")


def _stem(path: Path) -> str:
    return path.stem if path.suffix.lower() in (*FILE_SUFFIXES, ".yaml", ".yml") else path.name


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """Writes rows as JSON lines, atomically (temporary file, fsync, rename)."""

    def write(fh: IO[bytes]) -> None:
        for row in rows:
            line = json.dumps(row, ensure_ascii=False, default=str) + "\n"
            fh.write(line.encode("utf-8", "backslashreplace"))  # lone surrogates from a bad input row stay visible

    return write_atomic(path, write)


def write_yaml(path: str | os.PathLike, data: Any) -> Path:
    """Writes a YAML document, atomically."""
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=100)
    return write_atomic(path, text)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Writes one JSON document (indented), atomically."""
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"
    return write_atomic(path, text)
