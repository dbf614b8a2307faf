"""Rules: the registry (shipped rules, user files, duplicates), rules-extract and rules-apply."""

from __future__ import annotations

import json

import pytest
import yaml
from doubles import ScriptedBackend

from swift_callbacks import load_set
from swift_callbacks.builders import RuleError, build_rules_apply, build_rules_extract, load_rules, run_build
from swift_callbacks.builders.rules import check_rewrite, rule_key, slugify
from swift_callbacks.generation.runner import Generator

PUBLIC_RULES = ["Counterintuitive Thinking", "Blurring the Conceptual Boundaries", "Humor in Social Commentary",
                "Exaggeration"]  # fmt: skip


def generator(reply):
    return Generator(ScriptedBackend(lambda req: reply(req.messages[-1][1])), None, progress=False)


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


NEW_RULE = {"name": "Literal Reading", "description": "Takes a figure of speech at face value.",
            "rewrite": "Ask about the literal meaning of an idiom in the question."}  # fmt: skip

# ---------------------------------------------------------------------------------------------- registry


def test_shipped_rules():
    registry = load_rules()
    assert registry.names() == PUBLIC_RULES
    for rule in registry:
        assert len(rule.description) > 40 and len(rule.rewrite) > 40
    assert slugify("Humor in Social Commentary") == "humor-in-social-commentary"
    assert rule_key("  EXAGGERATION! ") == rule_key("exaggeration")


def test_user_rules_extend_and_override(tmp_path):
    changed = {"name": "exaggeration", "description": "Overstates.", "rewrite": "Overstate it.", "override": True}
    path = write_yaml(tmp_path / "mine.yaml", {"rules": [NEW_RULE, changed]})
    registry = load_rules(path)
    assert registry.names() == [*PUBLIC_RULES[:3], "exaggeration", "Literal Reading"]
    assert registry.select(["EXAGGERATION"])[0].description == "Overstates."
    alone = write_yaml(tmp_path / "alone.yaml", {"rules": [NEW_RULE]})
    assert load_rules(alone, defaults=False).names() == ["Literal Reading"]
    with pytest.raises(RuleError, match="'Literal Reading' is already defined"):
        load_rules([alone, path])  # files stack in order; a later file cannot silently redefine a rule


@pytest.mark.parametrize(
    ("rules", "match"),
    [
        ([{**NEW_RULE, "name": "Counterintuitive  thinking"}], r"'Counterintuitive thinking' is already defined"),
        ([NEW_RULE, {**NEW_RULE, "name": "literal reading"}], r"appears twice in the file"),
        ([{**NEW_RULE, "override": True}], r"'override: true' but there is no rule of that name"),
        ([{**NEW_RULE, "example": "x"}], r"unknown keys \['example'\]"),
        ([{"name": "X", "description": "d"}], r"'rewrite' must be a non-empty string"),
        ([{**NEW_RULE, "description": "  "}], r"'description' must be a non-empty string"),
        (["just a string"], r"expected a mapping"),
    ],
)
def test_rules_file_errors(tmp_path, rules, match):
    with pytest.raises(RuleError, match=match):
        load_rules(write_yaml(tmp_path / "r.yaml", {"rules": rules}))


def test_rules_file_shape_errors(tmp_path):
    with pytest.raises(RuleError, match="expected a mapping with a 'rules' list"):
        load_rules(write_yaml(tmp_path / "r.yaml", [NEW_RULE]))
    with pytest.raises(RuleError, match=r"unknown top-level keys \['rulez'\]"):
        load_rules(write_yaml(tmp_path / "r.yaml", {"rules": [], "rulez": []}))
    with pytest.raises(RuleError, match="cannot read rules file"):
        load_rules(tmp_path / "missing.yaml")
    with pytest.raises(RuleError, match=r"unknown rules \['Nope'\]"):
        load_rules().select(["Nope"])


# ------------------------------------------------------------------------------------------ rules-extract

SEEDS = [{"id": f"s{i}", "instruction": q} for i, q in enumerate(
    ["If I eat an apple a day, how many doctors do I scare away?", "Why can't I find the end of a ring?",
     "Is a fish that lives in the sea salty?"])]  # fmt: skip
EXTRACT_REPLY = """Analysis done.
```yaml
- name: Literal Reading
  description: Takes a figure of speech at face value.
  rewrite: Ask about the literal meaning of an idiom in the question.
- name: EXAGGERATION
  description: Already known under another case.
  rewrite: Should be dropped as a duplicate.
- name: Missing Rewrite
  description: No rewrite key.
- name: Category Slip
  description: Treats an object as a member of a category it only resembles.
  rewrite: Recast the question so an object is treated as if it belonged to a neighbouring category.
```"""


def test_rules_extract_parses_dedupes_and_writes_a_loadable_file(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(row) + "\n" for row in SEEDS), encoding="utf-8")
    prompts = []

    def reply(text):
        prompts.append(text)
        return EXTRACT_REPLY if "apple" in text else "I cannot find any rules here."

    out = tmp_path / "rules.yaml"
    result = run_build("rules-extract", seeds, out, generator=generator(reply), mapping="text=instruction",
                       seeds_per_request=2)  # fmt: skip
    assert len(prompts) == 2  # 3 seeds, 2 per request
    assert "1. If I eat an apple a day" in prompts[0] and "2. Why can't I find" in prompts[0]
    assert "education" in prompts[0] and "Exaggeration" in prompts[0]  # viewpoints, and the known rules to avoid
    assert [r["name"] for r in result.rows] == ["Literal Reading", "Category Slip"]
    assert sorted(r.reason for r in result.rejects) == ["bad rule", "duplicate rule", "malformed reply"]
    doc = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert doc["provenance"]["generator_backend"] == "scripted"
    assert "seed questions s0, s1" in doc["rules"][0]["source"]
    assert load_rules(out).names() == [*PUBLIC_RULES, "Literal Reading", "Category Slip"]
    rejects = [json.loads(line) for line in (tmp_path / "rules.rejects.jsonl").read_text().splitlines()]
    assert {r["source_id"] for r in rejects} == {"batch-0", "batch-1"}


def test_rules_extract_api_accepts_json():
    reply = json.dumps({"rules": [NEW_RULE]})
    result = build_rules_extract([{"text": "Why is water wet?"}], generator(lambda text: reply))
    assert [r["name"] for r in result.rows] == ["Literal Reading"]


# -------------------------------------------------------------------------------------------- rules-apply

MMLU = [
    {"question": "What is the boiling point of water at sea level in degrees Celsius?",
     "choices": ["90", "100", "110", "120"], "answer": 1, "subject": "physics"},
    {"question": "Which planet is known as the Red Planet?", "choices": ["Venus", "Mars", "Jupiter", "Saturn"],
     "answer": "B", "subject": "astronomy"},
    {"question": "Statement 1 | Every group is abelian. Statement 2 | Z_4 is cyclic.",
     "choices": ["True, True", "False, False", "True, False", "False, True"], "answer": 3,
     "subject": "abstract_algebra"},
]  # fmt: skip


def rewrite_reply(text):
    """Scripted rewrites: good ones, plus one leak (Mars) and one dropped number (100 -> 'a hundred')."""
    exaggerate = "Exaggeration:" in text
    if "boiling point" in text:
        if exaggerate:
            return "If a billion kettles sat at sea level, at how many degrees Celsius would their water boil?"
        return "Rewritten question: Most people guess water always boils at the same temperature; at sea level, what is it in degrees Celsius?"  # noqa: E501
    if "Red Planet" in text:
        return (
            "Which planet, a dusty world named Mars, is the Red Planet?"
            if exaggerate
            else ("Everyone calls one planet 'red', but which planet earns that nickname?")
        )
    if exaggerate:
        return "Statement 1 | Every group in the whole universe is abelian. Statement 2 | Z_4 is cyclic."
    return "Statement 1 | Every group, by intuition, is abelian. Statement 2 | Z_ four is cyclic."


def test_rules_apply_makes_one_dataset_per_rule(tmp_path):
    source = tmp_path / "mmlu.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in MMLU), encoding="utf-8")
    out = tmp_path / "silly.jsonl"
    result = run_build("rules-apply", source, out, generator=generator(rewrite_reply),
                       rule_names=["Counterintuitive Thinking", "Exaggeration"])  # fmt: skip
    assert result.stats.requests == 6
    assert sorted(f"{r.source_id}:{r.reason}" for r in result.rejects) == ["1:answer leaked", "2:dropped structure"]
    counter = load_set("counterintuitive", tmp_path / "silly.counterintuitive-thinking.jsonl")
    exaggeration = load_set("exaggeration", tmp_path / "silly.exaggeration.jsonl")
    assert counter.ids == ["0/rule/counterintuitive-thinking", "1/rule/counterintuitive-thinking"]
    assert exaggeration.ids == ["0/rule/exaggeration", "2/rule/exaggeration"]
    first = counter.rows[0]
    assert first["prompt"] == (
        "Most people guess water always boils at the same temperature; at sea level, what is it in degrees Celsius?\n"
        "A. 90\nB. 100\nC. 110\nD. 120"
    )
    assert first["completion"] == " B. 100" and first["answer"] == "B" and first["task"] == "physics"
    assert first["rule"] == "Counterintuitive Thinking" and first["original_question"] == MMLU[0]["question"]
    assert counter.rows[1]["completion"] == " B. Mars"  # letter answers kept too
    assert exaggeration.rows[1]["completion"] == " D. False, True" and exaggeration.tasks[1] == "abstract_algebra"
    assert (tmp_path / "silly.rejects.jsonl").exists()


def test_rules_apply_request_holds_rule_and_choices():
    gen = generator(lambda text: "Imagine a giant kettle: at sea level, at how many degrees Celsius does water boil?")
    result = build_rules_apply(MMLU[:1], gen, rule_names=["Exaggeration"], fmt="messages")
    text = gen.backend.calls[0].messages[-1][1]
    assert "Exaggeration: " in text and "A. 90\nB. 100" in text and MMLU[0]["question"] in text
    assert result.outputs().keys() == {"Exaggeration"}
    assert result.rows[0]["messages"][1] == {"role": "assistant", "content": "B. 100"}


@pytest.mark.parametrize(
    ("rewrite", "reason"),
    [
        ("", "empty rewrite"),
        ("what is the capital of france", "unchanged rewrite"),
        ("Paris is lovely; what is the capital of France?", "answer leaked"),
        ("Is it Paris or Lyon: what is the capital of France?", None),  # names other choices too: no leak
        ("Which city, in 2 words, is France's capital?", None),
    ],
)
def test_check_rewrite(rewrite, reason):
    choices, answer = ["Paris", "Lyon", "Nice", "Lille"], 0
    if reason is None:
        check_rewrite("What is the capital of France?", rewrite, choices, answer)
    else:
        with pytest.raises(Exception, match=reason):
            check_rewrite("What is the capital of France?", rewrite, choices, answer)


def test_check_rewrite_structure():
    with pytest.raises(Exception, match=r"a blank"):
        check_rewrite("The ___ is the largest organ.", "Which organ is the largest?", ["skin", "liver"], 0)
    with pytest.raises(Exception, match=r"number '12'"):
        check_rewrite("What is 12 times 3?", "What is a dozen times 3?", ["36", "30"], 0)


def test_rules_apply_rewrites_a_rules_file_even_when_all_its_rows_are_rejected(tmp_path):
    source = tmp_path / "mmlu.jsonl"
    row = {"id": "m1", "question": "Which planet is largest?", "choices": ["Mars", "Jupiter"], "answer": 1}
    source.write_text(json.dumps(row) + "\n", encoding="utf-8")
    replies = ["If planets held a size contest, which one would take the crown?", "Which planet is largest?"]
    for i, reply in enumerate(replies):  # the second rewrite is unchanged, so rejected
        gen = Generator(ScriptedBackend(lambda req, reply=reply: reply, model=f"v{i}"), None, progress=False)
        result = run_build("rules-apply", source, tmp_path / "out.jsonl", generator=gen, rule_names=["Exaggeration"])
        assert str(tmp_path / "out.exaggeration.jsonl") in result.files
    assert result.stats.rows_out == 0
    assert (tmp_path / "out.exaggeration.jsonl").read_text(encoding="utf-8") == ""  # no stale rows from run 1
