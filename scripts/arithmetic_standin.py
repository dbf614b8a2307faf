"""A deterministic stand-in for the strong LLM of the ScaleQuest pipeline, for smoke runs of its plumbing only.

Not part of the library: ``scripts/chat_server.py --responder arithmetic`` serves it over the OpenAI chat API
(what ``recipes/scalequest/pipeline_tiny_cpu.yaml`` talks to), and the tests wrap it as an in-process backend.

It plays the rewriter, the solvability judge, the solver and the responder on one-step arithmetic word problems
(the kind in ``recipes/scalequest/data``). It recognises which of the default prompts it was sent, reads the
question out of it, solves it with a keyword heuristic, and answers in the format the prompt asks for. Its answers
are varied on purpose, so that every filter has something to drop: it judges problems without two numbers and a
question mark unsolvable (with a stray "yes" in its reasoning), returns an empty rewrite for them, and, per sample,
sometimes gets the answer wrong or leaves out the ``\\boxed{}``. As a reward model (a question with a response) it
gives 1 for the right boxed answer and 0 otherwise, less a small length penalty; as a difficulty scorer (a bare
question) it grows with the size and count of the numbers.

It says nothing about the quality of the method: a real run uses real models.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence

from swift_callbacks.answers import boxed_answer, normalize_answer
from swift_callbacks.builders.scalequest.prompts import DEFAULT_PROMPTS, QUESTION_SLOT

VERSION = "1"  # bump when the answers change; model names carry it, so cached answers are not reused
_NUMBER = re.compile(r"\d+")
_SHARE = re.compile(r"\b(?:equal|equally|share[sd]?|split|divide[sd]?)\b")
_TIMES = re.compile(r"\b(?:each|every|per|times)\b")
_TAKE_AWAY = re.compile(
    r"\b(?:left|away|eats?|ate|los[et]s?|spen[dt]s?|sol[d]|sells?|use[sd]?|remain|fewer|leaves?|removed|popped)\b"
)


def solve(question: str) -> int | None:
    """The answer of a one-step arithmetic word problem by keyword heuristics, or None when it has no answer."""
    values = [int(n) for n in _NUMBER.findall(question)]
    text = question.lower()
    if len(values) < 2 or "?" not in question or not question.isascii():
        return None
    if _SHARE.search(text) and values[1] and values[0] % values[1] == 0:
        return values[0] // values[1]
    if _TIMES.search(text):
        product = 1
        for value in values:
            product *= value
        return product
    if _TAKE_AWAY.search(text):
        return values[0] - sum(values[1:])
    return sum(values)


def answer(messages: Sequence[Mapping[str, str]], n: int = 1) -> str | list[str]:
    """The stand-in's answer to a chat request of any stage (see the module docstring): one text, or ``n`` texts
    when a response is asked for with ``n > 1``."""
    if len(messages) == 2 and messages[1]["role"] == "assistant":
        return _score(messages[0]["content"], messages[1]["content"])
    text = messages[-1]["content"]
    for name, reply in (("solvability_judge", _judge), ("solvability_rewrite", _teacher_rewrite),
                        ("difficulty_rewrite", _harder_rewrite)):  # fmt: skip
        question = _fill_of(getattr(DEFAULT_PROMPTS, name), text)
        if question is not None:
            return reply(question)
    question = _fill_of(DEFAULT_PROMPTS.respond, text)
    if question is not None:
        return [_solution(question, k) for k in range(n)] if n > 1 else _solution(question, 0)
    return repr(_difficulty(text))  # a bare question: the difficulty scorer's request


def _fill_of(template: str, text: str) -> str | None:
    head, tail = template.split(QUESTION_SLOT)
    if text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail):
        return text[len(head) : len(text) - len(tail)]
    return None


def _judge(question: str) -> str:
    if solve(question) is None:
        return ("A clear yes would need at least two given quantities and a question to answer; this text does not "
                "have them.\nNo")  # fmt: skip
    return "The problem gives every quantity it needs and asks for one number, so it can be answered.\nYes"


def _tidy(question: str) -> str:
    text = " ".join(question.split())
    text = text[:1].upper() + text[1:]
    return text if text.endswith("?") else text.rstrip(".") + "?"


def _teacher_rewrite(question: str) -> str:
    answer = solve(question)
    if answer is None:
        return "Solution: the problem does not give enough information.\nSolvable: no.\nFinal question:"
    clarified = f"All quantities below are whole numbers. {_tidy(question)}"
    return f"Solution: the answer is {answer}.\nSolvable: yes, the wording can be clearer.\nFinal question: {clarified}"


def _harder_rewrite(question: str) -> str:
    if solve(question) is None:
        return "Methods:\n1. Add a step.\nPlan: none fits.\nRewrite:\nReview: nothing to review.\nFinal question:"
    sentences = re.split(r"(?<=[.!])\s+", " ".join(question.split()))
    harder = " ".join([*sentences[:-1], "Later the same thing happens again with 2 more.", sentences[-1]])
    return (f"Methods:\n1. Add a second step.\n2. Ask less directly.\nPlan: add a second step.\nRewrite: {harder}\n"
            f"Review: the problem is complete.\nFinal question: {harder}")  # fmt: skip


def _solution(question: str, index: int) -> str:
    answer = solve(question)
    if answer is None:
        return "I cannot find enough information to solve this."
    variant = int(hashlib.sha256(f"{question}|{index}".encode()).hexdigest(), 16) % 6
    if variant == 5:
        return f"Adding everything up, I think the result is about {answer}."
    given = ", ".join(_NUMBER.findall(question))
    shown = answer + 1 if variant == 4 else answer
    return (
        f"The problem gives {given}.\nCombining them step by step gives {shown}.\nSo the answer is \\boxed{{{shown}}}."
    )


def _difficulty(question: str) -> float:
    """A made-up difficulty in [0, 1]: larger numbers and more of them make a problem "harder"."""
    values = [int(n) for n in _NUMBER.findall(question)]
    if not values:
        return 0.0
    return min(1.0, (math.log10(1 + max(values)) + len(values)) / 8)


def _score(prompt: str, response: str) -> str:
    question = _fill_of(DEFAULT_PROMPTS.respond, prompt) or prompt
    answer, given = solve(question), boxed_answer(response)
    correct = answer is not None and given is not None and normalize_answer(given) == str(answer)
    return repr((1.0 if correct else 0.0) - len(response) / 10000)
