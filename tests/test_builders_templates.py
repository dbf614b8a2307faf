"""Builder templates (YAML data, user overrides, errors) and the reply parsers the builders' checks rely on."""

from __future__ import annotations

import pytest
import yaml

from swift_callbacks.builders.parsing import (
    Rejection,
    ends_with_answer,
    final_sentence,
    parse_labeled_pair,
    parse_list,
    parse_structured,
    parse_verdict,
    short_final_answer,
    strip_answer_text,
)
from swift_callbacks.builders.templating import SPEC, TemplateError, fill, load_templates

# ------------------------------------------------------------------------------------------------ templates


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_shipped_templates_are_complete_and_versioned(lang):
    templates = load_templates(lang)
    assert templates.version == "swift-study-builders@1"
    assert templates.lang == lang
    assert {b: set(f) for b, f in templates.entries.items()} == {b: set(f) for b, f in SPEC.items()}
    messages = templates.messages("cot", query="Q?", response="R")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "Q?" in messages[1]["content"] and "R" in messages[1]["content"]


def test_cot_directive_is_the_methods_directive():
    directive = load_templates("en").text("cot", "directive")
    assert (
        directive == " Please output the reason first and then the final answer, regardless of the above description."
    )
    assert load_templates("zh").text("cot", "directive").startswith("无论")


def test_fill_is_single_pass_and_leaves_other_braces():
    assert fill('{query} -> {"a": 1} {response}', {"query": "has {response} inside", "response": "R"}) == (
        'has {response} inside -> {"a": 1} R'
    )


def test_override_merges_per_field(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        yaml.safe_dump({"version": 3, "name": "mine", "templates": {"cot": {"user": "Q={query} R={response}"}}})
    )
    templates = load_templates("en", path)
    assert templates.version == "swift-study-builders@1+mine@3"
    assert templates.render("cot", "user", query="a", response="b") == "Q=a R=b"
    default = load_templates("en")
    assert templates.text("cot", "system") == default.text("cot", "system")  # untouched fields kept
    assert templates.entries["clarify"] == default.entries["clarify"]


def test_override_may_drop_the_system_message(tmp_path):
    templates = load_templates("en", {"version": 1, "name": "x", "templates": {"similar": {"system": ""}}})
    assert [m["role"] for m in templates.messages("similar", query="q", response="r")] == ["user"]


def _override(templates):
    return {"version": 1, "name": "x", "templates": templates}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_override({"cott": {"user": "{query}"}}), r"unknown builder 'cott'"),
        (_override({"cot": {"usr": "{query}"}}), r"templates.cot has unknown fields \['usr'\]"),
        (_override({"cot": {"user": "only {query}"}}), r"cot.user is missing placeholders \['\{response\}'\]"),
        (_override({"cot": {"user": "{query} {response} {answer}"}}), r"unknown placeholders \['\{answer\}'\]"),
        (_override({"cot": {"system": "{query}"}}), r"cot.system uses unknown placeholders .*allowed: none"),
        (_override({"cot": {"user": 5}}), r"cot.user must be a string, got int"),
        (_override({"evaluate": {"verdict_pass": []}}), r"verdict_pass must be a non-empty string or list"),
        (_override({"cot": "text"}), r"templates.cot must be a mapping"),
        ({"name": "x", "templates": {}}, r"'version' must be an integer"),
        ({"version": 1, "templates": {}}, r"'name' must be a non-empty string"),
        ({"version": 1, "name": "x", "lang": "zh", "templates": {}}, r"written for lang 'zh'"),
        ({"version": 1, "name": "x", "templates": {}, "extra": 1}, r"unknown top-level keys \['extra'\]"),
    ],
)  # fmt: skip
def test_override_errors(data, match):
    with pytest.raises(TemplateError, match=match):
        load_templates("en", data)


def test_override_file_errors(tmp_path):
    with pytest.raises(TemplateError, match="cannot read templates file"):
        load_templates("en", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("templates: [unclosed")
    with pytest.raises(TemplateError, match="not valid YAML"):
        load_templates("en", bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(TemplateError, match="expected a mapping"):
        load_templates("en", bad)
    with pytest.raises(TemplateError, match="unknown template language 'fr'"):
        load_templates("fr")


# -------------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("response", "expected"),
    [("87", "87"), ("  not similar \n", "not similar"), ("3,894,544", "3,894,544"), ("x" * 32, "x" * 32),
     ("x" * 33, None), ("line one\nline two", None), ("", None), ("1" * 40, "1" * 40)],
)  # fmt: skip
def test_short_final_answer(response, expected):
    assert short_final_answer(response) == expected


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ("38 and 49 make 87. So the answer is 87.", "87", True),
        ("So the answer is **87**.", "87", True),
        ("So the answer is: Not Similar!", "not similar", True),
        ('So the answer is "similar".', "Similar.", True),
        ("It is 187.", "87", False),
        ("So the answer is 87. Let me know if you need more.", "87", False),
        ("所以答案是八十七。", "八十七", True),
        ("So the answer is\n  Paris  ", "paris", True),
    ],
)
def test_ends_with_answer(text, answer, expected):
    assert ends_with_answer(text, answer) is expected


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ("So the answer is -87.", "87", False),
        ("So the answer is 1.87.", "87", False),
        ("So the answer is 0.87", "87", False),
        ("So the answer is 2/87", "87", False),
        ("So the answer is $-87$.", "87", False),
        ("So the answer is $-87$.", "-87", True),
        ("The answer is not 87.", "87", False),
        ("The answer isn't 87.", "87", False),
        ("So the answer is 87.0.", "87", True),
        ("So the total is 1,000.", "1000", True),
        ("So the answer is \\frac{2}{3}.", "2/3", True),
        ("所以答案是13", "3", False),
        ("所以答案是十三", "三", False),
        ("So the answer is x-b.", "b", False),
        ("So the answer is 4/b.", "b", False),
        ("<think>So the answer is 87.</think>I am not sure.", "87", False),
        ("<think>Is it 86? So the answer is", "87", False),
        ("<think>86?</think>\nSo the answer is 87.", "87", True),
    ],
)
def test_ends_with_answer_checks_numbers_by_value_and_rejects_lookalikes(text, answer, expected):
    assert ends_with_answer(text, answer) is expected


def test_parse_verdict_rejects_a_negated_passing_phrase():
    passing = ["the output meets all the requirements of the input", "the output meets all the requirements"]
    failing = [
        "the output does not meet all the requirements of the input",
        "the output does not meet all the requirements",
    ]
    with pytest.raises(Rejection, match="no verdict"):
        parse_verdict("Blah. It is false that the output meets all the requirements.", passing, failing)
    assert parse_verdict("Blah. Therefore, the output meets all the requirements.", passing, failing) is True


def test_parse_list_variants():
    reply = (
        "Here are the requirements:\n1. Use the letter K\n   for the first word.\n2) Two words only\n\nHope it helps!"
    )
    assert parse_list(reply) == ["Use the letter K for the first word.", "Two words only"]
    assert parse_list("- a\n* b\n• c\n(4) d\n5、e\n① f") == ["a", "b", "c", "d", "e", "f"]
    assert parse_list("1. same\n2. same\n3. other") == ["same", "other"]
    assert parse_list("<think>hmm</think>1. x") == ["x"]


@pytest.mark.parametrize(("reply", "reason"), [("No requirements.", "not a list"), ("1.\n2. ", "empty list"),
                                               ("3.5 kg of flour", "not a list")])  # fmt: skip
def test_parse_list_rejects(reply, reason):
    with pytest.raises(Rejection) as info:
        parse_list(reply)
    assert info.value.reason == reason and info.value.stage == "parse"


EN_PASS = ["the output meets all the requirements of the input", "the output meets all the requirements"]
EN_FAIL = [
    "the output does not meet all the requirements of the input",
    "the output does not meet all the requirements",
]
ZH_PASS, ZH_FAIL = ["输出满足输入的所有要求"], ["输出不满足输入的所有要求"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("First, ... Next, ... Thus, the output meets all the requirements of the input.", True),
        ("First, ... Thus, the answer is: the output does NOT meet all the requirements.", False),
        ("分析……\n因此，输出不满足输入的所有要求。", False),
        ("分析……因此，输出满足输入的所有要求。", True),
    ],
)
def test_parse_verdict(text, expected):
    passing, failing = (ZH_PASS, ZH_FAIL) if "输出" in text else (EN_PASS, EN_FAIL)
    assert parse_verdict(text, passing, failing) is expected


@pytest.mark.parametrize(
    "text",
    [
        "The output meets all the requirements of the input. But I am not sure.",  # verdict not in final sentence
        "Thus, the output meets all the requirements of the input, mostly",  # hedged
        "Thus, it is fine.",
        "",
    ],
)
def test_parse_verdict_is_strict(text):
    with pytest.raises(Rejection, match="no verdict"):
        parse_verdict(text, EN_PASS, EN_FAIL)


def test_final_sentence():
    assert final_sentence("One. Two! Three?\n") == "Three"
    assert final_sentence("第一句。第二句。") == "第二句"


def test_parse_labeled_pair():
    assert parse_labeled_pair("Query: What is 3+4?\nResponse: 7", "Query", "Response") == ("What is 3+4?", "7")
    multi = "**Query:** Sum:\n1 2\nResponse:\nline a\nline b"
    assert parse_labeled_pair(multi, "Query", "Response") == ("Sum:\n1 2", "line a\nline b")
    assert parse_labeled_pair("问题：一加一？\n回答：二", "问题", "回答") == ("一加一？", "二")


@pytest.mark.parametrize(
    "reply",
    ["Sure! Query: a\nResponse: b", "Query: a\nResponse: b\nResponse: c", "Query: a", "Query: \nResponse: b",
     "Query: a\nResponse:   "],
)  # fmt: skip
def test_parse_labeled_pair_rejects_malformed(reply):
    with pytest.raises(Rejection, match="malformed reply"):
        parse_labeled_pair(reply, "Query", "Response")


def test_parse_structured():
    assert parse_structured("Here:\n```yaml\n- name: A\n  x: 1\n```") == [{"name": "A", "x": 1}]
    assert parse_structured('[{"name": "A"}]') == [{"name": "A"}]
    with pytest.raises(Rejection, match="2 code blocks"):
        parse_structured("```yaml\na: 1\n```\n```yaml\nb: 2\n```")
    with pytest.raises(Rejection, match="not YAML or JSON"):
        parse_structured("```yaml\nname: [unclosed\n```")


def test_strip_answer_text():
    assert strip_answer_text('Rewritten question: "Why is the sky blue?"', ("Rewritten question",)) == (
        "Why is the sky blue?"
    )
    assert strip_answer_text("```\nWhy?\n```") == "Why?"
