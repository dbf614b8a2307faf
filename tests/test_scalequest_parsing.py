"""ScaleQuest's strict readers: boxed answers, final Yes/No verdicts, final-marker rewrites, answer comparison,
fail rates, and 13-gram decontamination."""

from __future__ import annotations

import pytest

from swift_callbacks.builders.scalequest import (
    ContaminationIndex,
    boxed_answer,
    fail_rate,
    majority_answer,
    normalize_answer,
    normalized_tokens,
    parse_final_verdict,
    text_after_final_marker,
)
from swift_callbacks.builders.scalequest.difficulty import reference_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),  # nested twice
        ("first \\boxed{1}, then \\boxed{2}; final \\boxed{3}", "3"),  # several boxes: the last one
        ("\\boxed{ 7 }", "7"),
        ("\\boxed {x+1}", "x+1"),  # a space before the brace
        ("\\fbox{9}", "9"),
        ("the set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
        ("no box here, the answer is 5", None),
        ("\\boxed{}", None),  # empty box
        ("\\boxed{\\frac{1}{2}", None),  # unbalanced: the final box never closes
        ("\\boxed{1} and later \\boxed{2", None),  # the last box is unbalanced: no final answer, not the earlier one
        ("\\boxed{a}}", "a"),  # a stray closing brace after a complete box is not part of it
    ],
)
def test_boxed_answer(text, expected):
    assert boxed_answer(text) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("The problem gives every number.\nYes", True),
        ("Reasoning...\nNo", False),
        ("yes", True),
        ("NO.", False),
        ("Reasoning.\n**Yes**", True),
        ('Reasoning.\n"No."', False),
        ("Reasoning.\nVerdict: Yes", True),
        ("Reasoning.\n**Final answer:** no", False),
        ("So the problem is well posed. Yes.", True),  # the last sentence of the last line
        ("Reasoning.\nYes!\n\n   ", True),  # trailing blank lines are ignored
        ("<think>no no no</think>\nClear enough.\nYes", True),  # a leading think block is dropped
        # "yes" mid-text but the final verdict is No: No.
        ("Yes, at first glance it looks solvable. But the total is never given.\nNo", False),
        ("It says yes to every condition, yet one is missing.\nNo", False),
        # no final verdict: never a silent yes
        ("Yes, the problem is solvable because it gives the numbers.", None),  # a hedged final line
        ("Yes\nThe problem is solvable.", None),  # the verdict is not on the last line
        ("The answer is yes", None),
        ("Yes or No", None),
        ("Yes/No", None),
        ("Maybe", None),
        ("yesterday", None),
        ("", None),
        ("   \n  ", None),
        ("\\boxed{Yes}", None),
    ],
)
def test_parse_final_verdict(reply, expected):
    assert parse_final_verdict(reply) is expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Plan...\nFinal question: How many apples are left?", "How many apples are left?"),
        ("Plan...\n**Final question:** Two lines\nof question.", "Two lines\nof question."),
        ("### Final Question: quoted\n", "quoted"),
        ('Final question: "In quotes?"', "In quotes?"),
        ("Final question: draft one\nReview: fix it\nFinal question: the final one", "the final one"),  # the last
        ("Final question:\n```\nfenced?\n```", "fenced?"),
        ("Plan...\nFinal question:", ""),  # an empty rewrite (the caller drops it)
        ("Plan...\nFinal question:   \n", ""),
        ("No marker at all.", None),
        ("The final question: mid-line is not a marker", None),
    ],
)
def test_text_after_final_marker(reply, expected):
    assert text_after_final_marker(reply, "Final question:") == expected


@pytest.mark.parametrize(
    ("a", "b"),
    [("0.5", "\\frac{1}{2}"), ("1/2", "\\dfrac{1}{2}"), ("1,000", "1000"), ("$42$", "42"), ("42.", "42.0"),
     ("\\text{ 7 }", "7"), ("x + 1", "x+1"), ("\\left(1,2\\right)", "(1,2)")],
)  # fmt: skip
def test_normalize_answer_makes_equal_answers_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


def test_normalize_answer_keeps_different_answers_apart():
    assert normalize_answer("12") != normalize_answer("21")
    assert normalize_answer("1/3") != normalize_answer("0.33")


def test_majority_and_fail_rate():
    assert majority_answer(["4", "4.0", "5", None]) == "4"
    assert majority_answer([None, None]) is None
    assert majority_answer(["3", "5"]) == "3"  # a tie goes to the answer seen first
    # by reference: missing answers fail too
    assert fail_rate(["4", "5", None, "4"], "4") == 0.5
    # by majority
    assert fail_rate(["4", "4", "5", None], None) == 0.5
    assert fail_rate([None, None], None) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("Natalia sold 48 clips.\n#### 72", "72"), ("so \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"), (" 15 ", "15"),
     (15, "15"), (None, None), ("", None)],
)  # fmt: skip
def test_reference_answer(value, expected):
    assert reference_answer(value) == expected


# ------------------------------------------------------------------------------------------------ decontamination

EVAL = "A train travels 60 miles per hour for 3 hours and then 40 miles per hour for 2 hours. How far does it go?"


def test_normalized_tokens():
    assert normalized_tokens("What is 3+4=7?  \\frac{1}{2}, É!") == ["what", "is", "3", "4", "7", "frac", "1", "2", "é"]
    assert normalized_tokens(" ..! ") == []


def test_thirteen_gram_overlap_is_detected_and_shorter_overlap_is_not():
    index = ContaminationIndex(13)
    index.add("gsm", "g1", EVAL)
    tokens = normalized_tokens(EVAL)
    # A row embedding exactly 13 consecutive eval tokens, with different text around them (and other punctuation).
    row = "Puzzle: " + " ".join(tokens[2:15]).upper() + " -- what then?"
    hit = index.match(row)
    assert hit is not None and hit[:2] == ("gsm", "g1") and hit[2] == " ".join(tokens[2:15])
    # 12 shared tokens are not enough.
    assert index.match("Puzzle: " + " ".join(tokens[2:14]) + " what then?") is None


def test_short_texts_match_only_whole():
    index = ContaminationIndex(13)
    index.add("eval", "short", "What is 15 plus 27?")  # 5 tokens: no 13-gram
    index.add("eval", "long", EVAL)
    assert index.match("what is 15 PLUS 27") is not None  # the same token sequence
    assert index.match("Tell me: what is 15 plus 27?") is None  # contains it, but is not it
    assert index.match("What is 15 plus 28?") is None
    assert index.match("A train travels 60 miles per hour.") is None  # a short row that is only part of a long text
    assert index.match("") is None and index.match("?!") is None
    index.add("eval", "empty", "  ")  # an eval text with no tokens indexes nothing
    assert index.match("anything at all") is None
