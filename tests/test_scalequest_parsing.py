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
from swift_callbacks.builders.scalequest.stages.difficulty import reference_answer


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


def test_cjk_characters_are_one_token_each():
    assert normalized_tokens("小明有5个苹果，还剩几个？") == list("小明有5个苹果还剩几个")
    index = ContaminationIndex(13)
    question = "小明有五个苹果，他又买了三个苹果，然后送给小红两个苹果，请问小明现在一共有多少个苹果呢？"
    index.add("cmath", "0", question)
    assert index.match("请回答下面的问题：" + question) is not None  # a verbatim eval question inside a longer row
    assert index.match("小明有五个梨。") is None


def _eval_question(i: int) -> str:
    return f"Tom has {i} apples and buys {i + 3} more at the market; a friend gives him {i + 5} more, so how many?"


def test_decontaminate_indexes_eval_rows_by_position_and_names_sets_uniquely(tmp_path):
    import json

    from swift_callbacks.builders.scalequest import StageError
    from swift_callbacks.builders.scalequest.stages.decontaminate import DecontaminateSettings, EvalSet, decontaminate

    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(path)

    gsm = write(tmp_path / "gsm8k" / "test.jsonl", [{"question": _eval_question(1)}, {"question": _eval_question(2)}])
    math = write(tmp_path / "math" / "test.jsonl", [{"problem": _eval_question(3)}])
    repeated = [{"id": "x", "question": _eval_question(12)}, {"id": "x", "question": _eval_question(13)}]
    dup = write(tmp_path / "dup.jsonl", [{"id": None, "question": _eval_question(i)} for i in (10, 11)] + repeated)
    rows = write(tmp_path / "in.jsonl", [{"question": _eval_question(i)} for i in (1, 2, 3, 10, 11, 12, 13, 50)])
    settings = DecontaminateSettings(eval_sets=[EvalSet(gsm), EvalSet(math, fields=["problem"]), EvalSet(dup)])
    result = decontaminate(rows, tmp_path / "out.jsonl", settings=settings)
    assert [r["question"] for r in result.rows] == [_eval_question(50)]
    metrics = result.stats.metrics
    assert metrics["eval_set_rows"] == {"gsm8k/test": 2, "math/test": 1, "dup": 4}
    assert metrics["contaminated_by_set"] == {"gsm8k/test": 2, "math/test": 1, "dup": 4}

    same_name = DecontaminateSettings(eval_sets=[EvalSet(gsm, name="a"), EvalSet(math, name="a", fields=["problem"])])
    with pytest.raises(StageError, match="share the name"):
        decontaminate(rows, tmp_path / "out2.jsonl", settings=same_name)


def test_boxes_and_verdicts_inside_think_blocks_do_not_count():
    shown = "<think>Maybe \\boxed{4}? No, inconsistent.</think>\nThe problem cannot be solved as stated."
    assert boxed_answer(shown) is None
    assert boxed_answer("<think>Try 12 - 5 = 7, so \\boxed{7}. Hmm, but 12*5 =") is None  # truncated reasoning
    assert boxed_answer("<think>\\boxed{1}</think><think>\\boxed{2}</think> So \\boxed{3}.") == "3"
    assert parse_final_verdict("<think>Is it solvable?\nYes\n") is None
    assert parse_final_verdict("<think>Hmm.\nNo</think>\nChecked.\nYes") is True


@pytest.mark.parametrize(("a", "b"), [("[1,100]", "[1100]"), ("(2,500)", "(2500)"), ("\\{1,234\\}", "\\{1234\\}")])
def test_thousands_separators_are_stripped_only_in_plain_numbers(a, b):
    assert normalize_answer(a) != normalize_answer(b)
    assert normalize_answer("1,000,000") == normalize_answer("1000000") == "1000000"
    assert normalize_answer("$-1,234.5$") == normalize_answer("-1234.5")
