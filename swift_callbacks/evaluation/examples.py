"""Evaluation rows -> :class:`EvalExample`: the prompt as the model saw prompts in training, and the gold answer.

Fields of a row (JSONL / JSON / Parquet; one clear error naming the set, example and field otherwise):

* the prompt: ``prompt`` (text, or chat messages), ``messages`` (the final assistant message is the reference
  completion, the messages before it the prompt), or ``question`` (with ``choices``: lettered options are listed
  and "Answer:" follows);
* the gold answer: ``answer`` (text or number); else the reference completion (``completion``, or the final
  assistant message), whose final answer is read with :func:`swift_callbacks.answers.final_answer` (so GSM8K's
  ``#### 72`` works). For ``choice`` sets, ``answer`` is the option's index (0-based), letter, or text, and
  ``choices`` a list of strings (or its Python/JSON list literal, as some MMLU exports write it);
* optional: ``id`` (else the row's position), ``task`` or ``subject`` (per-task accuracy; else ``all``).
"""

from __future__ import annotations

import ast
import json
import math
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..answers import final_answer, normalize_answer
from ..sets import SetError, example_ids, read_rows
from .config import EvalSetConfig

LETTERS = string.ascii_uppercase
DEMO_PREFIX = "demo:"
ALL_TASKS = "all"


@dataclass(frozen=True)
class EvalExample:
    """One evaluation example.

    Attributes:
        id: Unique within its set.
        task: Its task (``all`` when the set has none).
        prompt: Plain text, or chat messages (a tuple of ``(role, content)``).
        gold: The golden final answer (``choice``: the correct option's letter).
        reference: The golden response as written (the judge compares against it).
        choices: The options of a ``choice`` example.
        completion: The reference completion when the row has one (it fixes where training's prompt ended).
    """

    id: str
    task: str
    prompt: str | tuple[tuple[str, str], ...]
    gold: str
    reference: str = ""
    choices: tuple[str, ...] = field(default_factory=tuple)
    completion: str | tuple[tuple[str, str], ...] | None = None

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)

    def question_text(self) -> str:
        """The prompt as the judge reads it: the text, or the last user message."""
        if isinstance(self.prompt, str):
            return self.prompt
        users = [content for role, content in self.prompt if role == "user"]
        return users[-1] if users else self.prompt[-1][1]


def read_examples(config: EvalSetConfig) -> list[EvalExample]:
    """The examples of an evaluation set, checked row by row.

    Raises:
        SetError: An unreadable file, an empty set, or a row without a usable prompt or gold answer.
    """
    rows = set_rows(config)
    if config.limit is not None:
        rows = rows[: config.limit]
    if not rows:
        raise SetError(f"Set {config.name!r}: {config.path} has no rows")
    ids = example_ids(config.name, rows)
    return [_example(config, example_id, row) for example_id, row in zip(ids, rows, strict=True)]


def set_rows(config: EvalSetConfig) -> list[dict]:
    """The raw rows of a set: a file, or ``demo:<name>`` for a file bundled with ``swift_callbacks.assets``."""
    if config.path.startswith(DEMO_PREFIX):
        from ..assets.tiny import load_rows

        try:
            return load_rows(config.path.removeprefix(DEMO_PREFIX))
        except (FileNotFoundError, OSError, ValueError):
            raise SetError(f"Set {config.name!r}: no bundled file {config.path!r}") from None
    try:
        return read_rows(config.name, config.path)
    except SetError:
        raise
    except (OSError, ValueError) as err:  # a damaged Parquet file (pyarrow's errors are ValueError / OSError)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SetError(f"Set {config.name!r}: cannot read {config.path!r} ({reason})") from None


def _example(config: EvalSetConfig, example_id: str, row: Mapping[str, Any]) -> EvalExample:
    def fail(message: str) -> SetError:
        return SetError(f"Set {config.name!r}, example {example_id!r}: {message}")

    task = str(row.get("task") or row.get("subject") or ALL_TASKS)
    if config.metric == "choice":
        example = _choice_example(row, example_id, task, fail)
        if config.scoring == "text" and len(set(example.choices)) < len(example.choices):
            raise fail("'choices' lists the same option twice, so scoring: text cannot tell them apart")
        return example
    prompt, completion = _prompt_and_completion(row, fail)
    reference = _reference(row, completion)
    if isinstance(row.get("answer"), bool) or not isinstance(row.get("answer"), str | int | float | None):
        raise fail(f"'answer' must be text or a number, got {type(row['answer']).__name__}")
    if "answer" in row and row["answer"] is not None and str(row["answer"]).strip():
        text = _answer_text(row["answer"], fail)
        gold = final_answer(text) or text.strip()
    elif reference:
        gold = final_answer(reference, last_number=config.last_number)
        if gold is None:
            raise fail("no 'answer' field, and no final answer can be read from the completion; add 'answer'")
    else:
        raise fail("no gold answer: give an 'answer' field (or a 'completion' ending in its final answer)")
    if not normalize_answer(gold):  # "." normalizes to nothing: no reply could ever equal it
        raise fail(f"the gold answer {gold!r} has nothing to compare with; give the answer as text or a number")
    return EvalExample(example_id, task, prompt, gold, reference or gold, completion=completion)


def _answer_text(answer: str | int | float, fail) -> str:
    """A gold answer as text; a float is written in full ("1e20" as its digits), NaN and infinity are refused."""
    if isinstance(answer, float):
        if not math.isfinite(answer):
            raise fail(f"'answer' is {answer}; give the gold answer")
        return str(int(answer)) if answer.is_integer() else repr(answer)
    return str(answer)


def _prompt_and_completion(row: Mapping[str, Any], fail) -> tuple[Any, Any]:
    if "prompt" in row:
        prompt = _text_or_chat(row["prompt"], "prompt", fail)
        completion = row.get("completion")
        if completion is not None:
            completion = _text_or_chat(completion, "completion", fail)
        return prompt, completion
    if "messages" in row:
        messages = _text_or_chat(row["messages"], "messages", fail)
        if isinstance(messages, str) or len(messages) < 2 or messages[-1][0] != "assistant":
            raise fail("'messages' must end with the assistant's reference reply after at least one prompt message")
        return messages[:-1], messages[-1:]
    if "question" in row:
        return _text_or_chat(row["question"], "question", fail), None
    raise fail(f"no prompt: give 'prompt' (text or chat messages), 'messages' or 'question' (fields: {sorted(row)})")


def _text_or_chat(value: Any, name: str, fail) -> str | tuple[tuple[str, str], ...]:
    if isinstance(value, str):
        if not value.strip():
            raise fail(f"'{name}' is empty")
        return value
    if isinstance(value, list) and value and all(isinstance(m, Mapping) for m in value):
        for i, m in enumerate(value):
            for key in ("role", "content"):
                if not isinstance(m.get(key), str):
                    got = "no" if key not in m else type(m[key]).__name__
                    raise fail(f"'{name}' message {i} has {got} {key!r}; give it as text")
        return tuple((m["role"], m["content"]) for m in value)
    raise fail(f"'{name}' must be text or a non-empty list of chat messages, got {type(value).__name__}")


def _reference(row: Mapping[str, Any], completion: Any) -> str:
    if isinstance(completion, str):
        return completion.strip()
    if completion:
        return completion[-1][1].strip()
    return str(row.get("answer") or "").strip()


def _choice_example(row: Mapping[str, Any], example_id: str, task: str, fail) -> EvalExample:
    choices = _choices(row.get("choices"), fail)
    if "prompt" in row:
        prompt = _text_or_chat(row["prompt"], "prompt", fail)
    elif "question" in row:
        question = _text_or_chat(row["question"], "question", fail)
        if not isinstance(question, str):
            raise fail("'question' of a choice example must be text")
        listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        prompt = f"{question.strip()}\n{listed}\nAnswer:"
    else:
        raise fail(f"no prompt: give 'question' (the options are listed after it) or 'prompt' (fields: {sorted(row)})")
    letter = _gold_letter(row.get("answer"), choices, fail)
    return EvalExample(example_id, task, prompt, letter, choices[LETTERS.index(letter)], tuple(choices))


def _choices(value: Any, fail) -> list[str]:
    if isinstance(value, str):  # "['a', 'b']" as some exports write the list
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise fail("'choices' is text that is not a list literal; give a list of strings") from None
    if hasattr(value, "tolist"):  # a numpy array from Parquet
        value = value.tolist()
    if not isinstance(value, list | tuple) or len(value) < 2 or not all(isinstance(c, str) for c in value):
        raise fail("'choices' must be a list of at least two strings")
    if len(value) > len(LETTERS):
        raise fail(f"'choices' has {len(value)} options; at most {len(LETTERS)} are supported")
    choices = [c.strip() for c in value]
    if not all(choices):
        raise fail(f"'choices' has an empty option (option {LETTERS[choices.index('')]}); every option needs text")
    return choices


def _gold_letter(answer: Any, choices: list[str], fail) -> str:
    """An integer is a 0-based index; text is a letter, the text of one choice, or an index written as text.
    Text that reads both ways and disagrees ("1" with choices ["1", "2"]) is refused, never guessed."""
    if isinstance(answer, bool) or answer is None:
        raise fail("'answer' must be the correct option's index, letter or text")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise fail(f"'answer' index {answer} is outside the {len(choices)} choices (0-based)")
        return LETTERS[answer]
    text = str(answer).strip()
    readings = set()
    if len(text) == 1 and text.upper() in LETTERS[: len(choices)]:
        readings.add(text.upper())
    if text.isdigit() and int(text) < len(choices):
        readings.add(LETTERS[int(text)])
    matches = [i for i, c in enumerate(choices) if c == text]
    if len(matches) == 1:
        readings.add(LETTERS[matches[0]])
    if len(readings) == 1:
        return readings.pop()
    if readings:
        raise fail(f"'answer' {text!r} is ambiguous (options {sorted(readings)}); give the index as a number")
    raise fail(f"'answer' {text!r} is not an index, a letter A-{LETTERS[len(choices) - 1]} or one of the choices")
