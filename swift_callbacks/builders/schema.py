"""Input fields each builder reads, column mapping, and per-row validation.

A bad row never stops a build: it becomes a :class:`Reject` naming the field and the problem, and the other rows
go on. Values are checked, not coerced, except where the input format cannot carry the type (a CSV cell holding a
JSON list of choices, an answer letter or a digit string).
"""

from __future__ import annotations

import ast
import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .records import Reject

LETTERS = string.ascii_uppercase
_LABELS = {"pos": "pos", "positive": "pos", "good": "pos", "1": "pos", "true": "pos",
           "neg": "neg", "negative": "neg", "bad": "neg", "0": "neg", "false": "neg"}  # fmt: skip


@dataclass(frozen=True)
class Field:
    """One input field.

    Attributes:
        name: Field name the builder reads (the target of ``--map``).
        kind: ``"text"``, ``"id"``, ``"label"``, ``"choices"`` or ``"answer"``.
        required: Whether a row without it is rejected.
    """

    name: str
    kind: str = "text"
    required: bool = True


_ID, _TASK = Field("id", "id", required=False), Field("task", required=False)
STRATEGY_FIELDS = (Field("query"), Field("response"), _TASK, _ID)
EVALUATE_FIELDS = (*STRATEGY_FIELDS, Field("negative_response", required=False), Field("label", "label", False))
SEED_FIELDS = (Field("text"), _ID)
CHOICE_FIELDS = (Field("question"), Field("choices", "choices"), Field("answer", "answer"),
                 Field("subject", required=False), _ID)  # fmt: skip


@dataclass
class Row:
    """A validated input row.

    Attributes:
        source_id: The row's ``id``, or its position in the input.
        values: Checked field values (absent optional fields are missing, not None).
        raw: The row as read, for the rejects file.
    """

    source_id: str
    values: dict[str, Any]
    raw: dict[str, Any]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)


def parse_mapping(spec: str | Sequence[str] | Mapping[str, str] | None, fields: Sequence[Field]) -> dict[str, str]:
    """Parses ``"query=question,response=answer"`` (or a list of such strings, or a dict) into field -> column.

    A column list joined by ``+`` (``choices=A+B+C+D``) gathers several columns into one list field.

    Raises:
        ValueError: Malformed pair or a field the builder does not read.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        pairs = list(spec.items())
    else:
        parts = [spec] if isinstance(spec, str) else list(spec)
        pairs = [_split_pair(p) for part in parts for p in part.split(",") if p.strip()]
    known = {f.name for f in fields}
    mapping = {}
    for target, column in pairs:
        if target not in known:
            raise ValueError(f"--map: unknown field {target!r}; this build reads {sorted(known)}")
        mapping[target] = column
    return mapping


def _split_pair(pair: str) -> tuple[str, str]:
    target, sep, column = pair.partition("=")
    if not sep or not target.strip() or not column.strip():
        raise ValueError(f"--map: expected FIELD=COLUMN, got {pair.strip()!r}")
    return target.strip(), column.strip()


def validate_rows(
    rows: Sequence[tuple[int, Any]], fields: Sequence[Field], mapping: Mapping[str, str] | None = None
) -> tuple[list[Row], list[Reject]]:
    """Maps and checks rows; returns the valid ones and a reject for each other.

    Args:
        rows: ``(position, row)`` pairs; the position is the fallback id.
        fields: The fields the builder reads.
        mapping: Field -> source column (see :func:`parse_mapping`); unmapped fields read the same-named column.
    """
    mapping = dict(mapping or {})
    valid: list[Row] = []
    rejects: list[Reject] = []
    seen: set[str] = set()
    for position, raw in rows:
        try:
            row = _validate(position, raw, fields, mapping)
            if row.source_id in seen:
                raise _Invalid("duplicate id", f"id {row.source_id!r} appears earlier in the input")
        except _Invalid as bad:
            rejects.append(Reject(_fallback_id(position, raw, mapping), "validate", bad.reason, raw, bad.detail))
            continue
        seen.add(row.source_id)
        valid.append(row)
    return _check_tasks(valid, rejects, _task_field(fields))


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _fallback_id(position: int, raw: Any, mapping: Mapping[str, str]) -> str:
    value = raw.get(mapping.get("id", "id")) if isinstance(raw, Mapping) else None
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) and value != "" else str(position)


def _validate(position: int, raw: Any, fields: Sequence[Field], mapping: Mapping[str, str]) -> Row:
    if not isinstance(raw, Mapping):
        raise _Invalid("wrong type", f"row is a {type(raw).__name__}, not an object")
    names = {f.name for f in fields}
    source = raw
    if {"query", "response"} <= names:  # a set in one of TRL's forms is read as it is, field by field
        given = _given(raw)
        trl = {k: v for k, v in trl_query_response(raw).items() if k not in mapping and k not in given}
        if "response" not in trl:  # a rejected answer is the negative of the chosen one only
            trl.pop("negative_response", None)
        source = {**raw, **trl}
    values: dict[str, Any] = {}
    for f in fields:
        column = mapping.get(f.name, f.name)
        value = _lookup(source, column)
        if f.kind == "text" and column != f.name and (text := _chat_text(f.name, value)) is not None:
            value = text  # --map response=COLUMN where COLUMN holds chat messages
        # An empty optional cell (CSV has no null) means "not given", not "given and empty".
        if _absent(value) or (not f.required and isinstance(value, str) and not value.strip()):
            if f.required:
                raise _Invalid("missing field", _missing(f.name, column, raw))
            continue
        values[f.name] = _CHECKS[f.kind](f.name, value)
    if "choices" in values and "answer" in values and values["answer"] >= len(values["choices"]):
        raise _Invalid("bad value", f"answer index {values['answer']} but only {len(values['choices'])} choices")
    source_id = values.pop("id", None) or str(position)
    return Row(source_id, values, dict(raw))


def _given(raw: Mapping) -> set[str]:
    """Columns with a value (Parquet and CSV give every row every column, null or empty where it has none)."""
    return {k for k, v in raw.items() if not _absent(v) and not (isinstance(v, str) and not v.strip())}


def _missing(name: str, column: str, raw: Mapping) -> str:
    """Which field is missing, what the row has instead, and the ``--map`` that would read it."""
    present = sorted(str(k) for k, v in raw.items() if not _absent(v))  # null cells of other rows' columns: absent
    if column != name:
        return (f"field {name!r} is missing: --map reads it from column {column!r}, which the row lacks or leaves "
                f"null (the row has {present})")  # fmt: skip
    if name == "query" and _absent(raw.get("prompt")) and not _absent(raw.get("chosen")):
        return ("field 'query' is missing: a preference row without a 'prompt' column needs chosen/rejected "
                "conversations of one user message and its answer (this row's chosen is plain text or more turns); "
                "or give prompt/chosen/rejected")  # fmt: skip
    chat = raw.get("messages") if not _absent(raw.get("messages")) else raw.get("prompt")
    from_chat = isinstance(chat, list | tuple | str) and not isinstance(raw.get("prompt"), str)
    if name in ("query", "response") and from_chat:
        if isinstance(chat, str):
            problem = "the chat column holds text, not a list of messages (a CSV cell?); use JSONL or Parquet"
        elif any(isinstance(m, Mapping) and not isinstance(m.get("content"), str) for m in chat):
            problem = "a message's content is not text (a list of parts, or a tool call); give text content"
        else:
            problem = "the messages are not one user question and its assistant answer (a multi-turn conversation?)"
        return f"field {name!r} cannot be read from the row's chat messages: {problem}"
    hint = f"; read it from one of them with --map {name}=COLUMN" if present else ""
    return f"field {name!r} is missing (the row has {present}{hint})"


def trl_query_response(raw: Mapping) -> dict[str, str]:
    """``query`` and ``response`` of a row in one of TRL's forms (as the callback reads probe sets, and also
    preference rows, which the callback's sets do not take).

    ``prompt``/``completion`` as text, or as chat messages (the prompt's one user message and the completion's
    last assistant message; a system message may precede), or ``messages`` ending with a user then an assistant
    message. A preference row (``prompt``/``chosen``/``rejected``, or ``chosen``/``rejected`` conversations that
    hold the prompt) gives ``chosen`` as the response and ``rejected`` as ``negative_response``. A multi-turn
    conversation has no single query to rewrite: its query is left out, so the row is rejected as missing one.
    Returns what it could read (possibly nothing).
    """
    if not _absent(raw.get("messages")):  # a Parquet/CSV column of another format's rows is null here
        return _exchange(raw.get("messages"))
    found: dict[str, str] = {}
    prompt = raw.get("prompt")
    preference = _absent(raw.get("completion")) and not _absent(raw.get("chosen"))
    if isinstance(prompt, str):
        found["query"] = prompt
    elif (turns := _turns(prompt)) and [r for r, _ in turns] == ["user"]:
        found["query"] = turns[0][1]
    elif _absent(prompt) and preference:  # implicit prompt: each conversation starts with it
        query = _exchange(raw.get("chosen")).get("query")
        if query is not None and _exchange(raw.get("rejected")).get("query") not in (None, query):
            raise _Invalid("bad value", "the chosen and rejected conversations start with different user messages")
        if query is not None:
            found["query"] = query
    answers = {"response": raw.get("chosen"), "negative_response": raw.get("rejected")} if preference else {
        "response": raw.get("completion")}  # fmt: skip
    for name, answer in answers.items():
        if isinstance(answer, str):
            found[name] = answer.strip()
        elif (turns := _turns(answer)) and turns[-1][0] == "assistant":
            found[name] = turns[-1][1]
    return found


def _exchange(messages: Any) -> dict[str, str]:
    """``query`` and ``response`` of a chat that is one user message and its assistant answer, else nothing."""
    turns = _turns(messages)
    if turns and len(turns) == 2 and [r for r, _ in turns] == ["user", "assistant"]:
        return {"query": turns[0][1], "response": turns[1][1]}
    return {}


def _chat_text(name: str, value: Any) -> str | None:
    """The text a mapped chat column gives a text field: the last assistant message for ``response``, the one user
    message for any other field; None when ``value`` is not chat messages (it is then checked as it is)."""
    turns = _turns(value)
    if not turns:
        return None
    roles = [r for r, _ in turns]
    if name == "response" and roles[-1] == "assistant":
        return turns[-1][1]
    if name != "response" and roles == ["user"]:
        return turns[0][1]
    raise _Invalid(
        "wrong type", f"field {name!r} is mapped to chat messages with roles {roles}, which hold no single "
        f"{'assistant answer' if name == 'response' else 'user question'} to read"
    )  # fmt: skip


def _turns(messages: Any) -> list[tuple[str, str]] | None:
    """(role, content) of chat messages without system messages; None when ``messages`` is not a chat."""
    if hasattr(messages, "tolist"):  # a numpy array from Parquet
        messages = messages.tolist()
    if not isinstance(messages, list | tuple) or not messages:
        return None
    turns = []
    for m in messages:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None
        if m["role"] != "system":
            turns.append((m["role"], m["content"]))
    return turns


def _lookup(raw: Mapping, column: str) -> Any:
    if "+" in column and column not in raw:  # several columns gathered into one list (choices=A+B+C+D)
        parts = [raw.get(c.strip()) for c in column.split("+")]
        return None if any(_absent(p) for p in parts) else parts
    return raw.get(column)


def _absent(value: Any) -> bool:
    # pandas/pyarrow give NaN for an empty CSV or Parquet cell; treat it like a missing value.
    return value is None or (isinstance(value, float) and value != value)


def _check_text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid("wrong type", f"field {name!r} must be a string, got {type(value).__name__}: {_show(value)}")
    if not value.strip():
        raise _Invalid("empty field", f"field {name!r} is empty")
    return value


def _check_id(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Invalid("wrong type", f"field {name!r} must be a string or an integer, got {type(value).__name__}")
    if not str(value).strip():
        raise _Invalid("empty field", f"field {name!r} is empty")
    return str(value)


def _check_label(name: str, value: Any) -> str:
    key = str(value).strip().lower() if isinstance(value, str | int | bool) else None
    if key not in _LABELS:
        raise _Invalid("bad value", f"field {name!r} must be pos/neg (or positive/negative, 1/0), got {_show(value)}")
    return _LABELS[key]


def _check_choices(name: str, value: Any) -> list[str]:
    if isinstance(value, str):  # a CSV cell holds a list as JSON text, or as a Python literal (MMLU exports)
        try:
            value = json.loads(value)
        except ValueError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise _Invalid(
                    "wrong type", f"field {name!r} must be a list (or JSON / Python list text), got {_show(value)}"
                ) from None
    if hasattr(value, "tolist"):  # numpy arrays from Parquet through pandas
        value = value.tolist()
    if not isinstance(value, list | tuple) or len(value) < 2:
        raise _Invalid("wrong type", f"field {name!r} must be a list of at least two choices, got {_show(value)}")
    if len(value) > len(LETTERS):
        raise _Invalid("bad value", f"field {name!r} has {len(value)} choices; at most {len(LETTERS)} are lettered")
    if not all(isinstance(c, str | int | float) and not isinstance(c, bool) and str(c).strip() for c in value):
        raise _Invalid("wrong type", f"field {name!r} must hold non-empty strings, got {_show(value)}")
    return [str(c).strip() for c in value]


def _check_answer(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        if len(text) == 1 and text.upper() in LETTERS:
            return LETTERS.index(text.upper())
    raise _Invalid("bad value", f"field {name!r} must be a choice index (0, 1, ...) or letter (A, B, ...), "
                                f"got {_show(value)}")  # fmt: skip


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


_CHECKS = {"text": _check_text, "id": _check_id, "label": _check_label, "choices": _check_choices,
           "answer": _check_answer}  # fmt: skip


def _task_field(fields: Sequence[Field]) -> str | None:
    names = {f.name for f in fields}
    return "task" if "task" in names else "subject" if "subject" in names else None


def _check_tasks(valid: list[Row], rejects: list[Reject], task_field: str | None) -> tuple[list[Row], list[Reject]]:
    """Rejects rows without a task when other rows have one: a probe set needs a task on all rows or none."""
    if task_field is None:
        return valid, rejects
    with_task = [row for row in valid if task_field in row.values]
    if not with_task or len(with_task) == len(valid):
        return valid, rejects
    for row in valid:
        if task_field not in row.values:
            detail = f"field {task_field!r} is missing here but present on other rows; a set needs it on all or none"
            rejects.append(Reject(row.source_id, "validate", "missing task", row.raw, detail))
    return with_task, rejects
