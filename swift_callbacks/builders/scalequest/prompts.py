"""The prompts of the ScaleQuest stages, written for this project.

They follow the structure the method describes (a math teacher who solves, checks solvability and rewrites; a
make-it-harder rewrite with a list of methods, a plan, the rewrite and a review, read from a final marker; a
solvability judge that reasons and ends with Yes or No; a step-by-step solver with a boxed final answer), in this
project's own wording. Every template holds ``{question}`` exactly once; it is filled with ``str.replace`` so the
braces of ``\\boxed{}`` need no escaping. A pipeline config can override any of them (``prompts:`` section).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...generation.base import Message

QUESTION_SLOT = "{question}"
VERSION = "scalequest-prompts-1"

SOLVABILITY_REWRITE = """\
You are an experienced math teacher checking a problem before it goes to your students.

Problem:
<<<
{question}
>>>

Work through the following, in order:
1. Solve the problem step by step.
2. Decide whether it can be solved as written: does it give every quantity it needs, are its conditions \
consistent with each other, and does it ask for one well-defined answer? Name any gap, contradiction or ambiguity \
you found.
3. Rewrite the problem so that it is fully solvable. Fill the gaps and remove contradictions and ambiguity while \
keeping its topic, its setting and its level. If it was already solvable, only tidy its wording.

End your reply with a line that starts with "Final question:" followed by the rewritten problem, and write \
nothing after it."""

DIFFICULTY_REWRITE = """\
You make math problems more challenging without breaking them.

Original problem:
<<<
{question}
>>>

Answer in four parts:
Methods: list several ways this problem could be made harder, for example more reasoning steps, an extra \
condition, a less direct question, or a second concept combined with the first.
Plan: choose the methods from your list that fit this problem and say how you will apply them.
Rewrite: write the harder problem following your plan. It must stay a single self-contained problem with exactly \
one correct answer, and it should grow by no more than about thirty words.
Review: check the rewritten problem for missing information, contradictions or ambiguity, and correct it.

End your reply with a line that starts with "Final question:" followed by the final version of the harder \
problem, and write nothing after it."""

SOLVABILITY_JUDGE = """\
Decide whether the math problem below can be solved.

Problem:
<<<
{question}
>>>

Call it solvable only if it is stated clearly, supplies every quantity that is needed, contains no conditions \
that contradict each other, and asks for an answer that is uniquely determined. Think it through briefly. Then \
write your verdict alone on the last line: "Yes" if the problem is solvable, "No" if it is not."""

RESPOND = """\
{question}

Work through this problem step by step, then write the final answer inside \\boxed{}."""

FINAL_MARKER = "Final question:"


@dataclass(frozen=True)
class Prompts:
    """The templates one run uses (all part of the generation cache key through the messages they produce).

    Attributes:
        solvability_rewrite: QPO math-teacher prompt: solve, check solvability, rewrite.
        difficulty_rewrite: QPO make-it-harder prompt: methods, plan, rewrite, review.
        final_marker: The line prefix both rewrite prompts end with; the rewrite is read after its last occurrence.
        solvability_judge: The solvability filter's judge prompt (reason, then a final Yes/No line).
        respond: The solver prompt of the difficulty labels and the responses (final answer in ``\\boxed{}``).
    """

    solvability_rewrite: str = SOLVABILITY_REWRITE
    difficulty_rewrite: str = DIFFICULTY_REWRITE
    final_marker: str = FINAL_MARKER
    solvability_judge: str = SOLVABILITY_JUDGE
    respond: str = RESPOND

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "final_marker":
                if not value.strip():
                    raise ValueError("prompts.final_marker: must not be empty")
            elif value.count(QUESTION_SLOT) != 1:
                raise ValueError(f"prompts.{field.name}: must contain {QUESTION_SLOT} exactly once")

    def messages(self, name: str, question: str) -> list[Message]:
        """The chat messages of template ``name`` filled with ``question`` (one user turn)."""
        template = getattr(self, name)
        return [{"role": "user", "content": template.replace(QUESTION_SLOT, question)}]


DEFAULT_PROMPTS = Prompts()
