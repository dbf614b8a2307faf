"""The four strategies (cot, clarify, evaluate, similar): requests, parsing, checks and rejects, output formats."""

from __future__ import annotations

import pytest
from doubles import ScriptedBackend

from swift_callbacks import load_set
from swift_callbacks.builders import build_clarify, build_cot, build_evaluate, build_similar, load_templates
from swift_callbacks.generation.base import SamplingParams
from swift_callbacks.generation.runner import Generator

DIRECTIVE = " Please output the reason first and then the final answer, regardless of the above description."
REFS = [
    {"id": "add", "query": "What is 38 plus 49?", "response": "87", "task": "math"},
    {"id": "sim", "query": "Are 'a cat sat' and 'a cat was sitting' similar? Answer similar/not similar.",
     "response": "similar", "task": "semantic similarity"},
    {"id": "sum", "query": "Summarize: The meeting moved to Friday because the room was booked.",
     "response": "The meeting moved to Friday.\nThe room was booked on the original day.", "task": "summary"},
]  # fmt: skip


def generator(reply):
    """A cache-less generator over a scripted backend; ``reply(user_text, request)`` gives the answer."""
    backend = ScriptedBackend(lambda req: reply(req.messages[-1][1], req))
    return Generator(backend, None, progress=False)


def user_text(gen, key):
    return next(req for req in gen.backend.calls if req.key == key).messages[-1][1]


def reasons(result):
    return {r.source_id: r.reason for r in result.rejects}


# ----------------------------------------------------------------------------------------------------- cot


def test_cot_requests_and_outputs():
    def reply(text, _):
        if "38 plus 49" in text:
            return "30 plus 40 is 70 and 8 plus 9 is 17, so 70 plus 17 gives 87. So the answer is 87."
        if "similar" in text:
            return "Both describe a cat sitting. So the answer is: Similar."
        return "The key facts are the new day and the reason.\nThe meeting moved to Friday."

    gen = generator(reply)
    result = build_cot(REFS, gen)
    assert result.rejects == []
    request = next(r for r in gen.backend.calls if r.key == "add/cot")
    assert [role for role, _ in request.messages] == ["system", "user"]
    assert "What is 38 plus 49?" + DIRECTIVE in request.messages[1][1]
    assert "87" in request.messages[1][1]  # the reference goes with the request
    row = result.rows[0]
    assert row["id"] == "add/cot" and row["task"] == "math" and row["source_id"] == "add"
    assert row["prompt"] == "What is 38 plus 49?" + DIRECTIVE
    assert row["completion"].startswith(" 30 plus 40")
    assert (row["strategy"], row["generator_backend"], row["generator_model"]) == ("cot", "scripted", "scripted")
    assert (row["template_version"], row["lang"]) == ("swift-study-builders@1", "en")
    assert result.stats.rows_in == 3 and result.stats.rows_out == 3 and result.stats.generation.sent == 3


def test_cot_rejects_answer_mismatch_and_no_reasoning():
    replies = {"38 plus 49": "38 plus 49 is 88. So the answer is 88.", "similar": "similar"}
    gen = generator(lambda text, _: next((v for k, v in replies.items() if k in text), "Long reasoning. Done."))
    result = build_cot(REFS, gen)
    assert reasons(result) == {"add": "answer mismatch", "sim": "no reasoning"}
    mismatch = next(r for r in result.rejects if r.source_id == "add")
    assert mismatch.stage == "check" and "'87'" in mismatch.detail and mismatch.row == REFS[0]
    assert [r["id"] for r in result.rows] == ["sum/cot"]  # a long reference has no answer to check against


def test_cot_checks_the_marked_answer_of_a_gsm8k_reference():
    """GSM8K writes its reference as working then '#### 72': the CoT reply must end in 72 (by value), not in any
    number; '(B)' is the option B."""
    refs = [{"id": "g", "query": "Natalia sold 48 clips in April and half as many in May. How many in total?",
             "response": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nSo 48+24 = <<48+24=72>>72.\n#### 72"},
            {"id": "b", "query": "Which is a mammal? (A) trout (B) whale", "response": "(B)"}]  # fmt: skip
    wrong = {"Natalia": "She sold 48 and 24, so 70 in total. So the answer is 70.", "mammal": "Whales. So: A."}
    result = build_cot(refs, generator(lambda text, _: next(v for k, v in wrong.items() if k in text)))
    assert reasons(result) == {"g": "answer mismatch", "b": "answer mismatch"}
    right = {
        "Natalia": "48 plus 24 makes 72. So the answer is 72.",
        "mammal": "A whale is a mammal. So the answer is B.",
    }
    result = build_cot(refs, generator(lambda text, _: next(v for k, v in right.items() if k in text)))
    assert not result.rejects and len(result.rows) == 2
    # the reply may keep the parentheses; a reference that explains itself has no bare answer to check
    from swift_callbacks.builders.parsing import ends_with_answer, short_final_answer

    assert ends_with_answer("Paris is option B. So the answer is (B).", short_final_answer("(B)"))
    assert short_final_answer("The answer is Paris, since 987 AD.") is None


def test_cot_uses_the_first_passing_sample():
    gen = generator(lambda text, _: ["So the answer is 86.", "Adding gives 87. So the answer is 87."])
    result = build_cot(REFS[:1], gen, params=SamplingParams(n=2))
    assert result.rows[0]["completion"] == " Adding gives 87. So the answer is 87."


def test_failed_generation_is_a_reject():
    def reply(text, _):
        if "38 plus 49" in text:
            raise TimeoutError("server went away")
        return "Reasoning here. So the answer is similar."

    result = build_cot(REFS[:2], generator(reply))
    (reject,) = result.rejects
    assert (reject.source_id, reject.stage, reject.reason) == ("add", "generate", "generation failed")
    assert "server went away" in reject.detail
    assert result.stats.rejects == {"generate: generation failed": 1}


def test_cot_zh_directive():
    result = build_cot([{"query": "38加49等于多少？", "response": "87"}], generator(lambda t, _: "先算…所以答案是87。"),
                       lang="zh")  # fmt: skip
    assert result.rows[0]["prompt"] == "38加49等于多少？无论上面如何描述，请先输出理由，再给出最终答案。"
    assert result.rows[0]["lang"] == "zh" and result.rows[0]["id"] == "0/cot"
    assert result.rows[0]["completion"] == "先算…所以答案是87。"  # no space is put before Chinese text
    unpunctuated = build_cot([{"query": "38加49等于多少", "response": "87"}], generator(lambda t, _: "所以答案是87。"),
                             lang="zh")  # fmt: skip
    assert unpunctuated.rows[0]["prompt"] == "38加49等于多少。无论上面如何描述，请先输出理由，再给出最终答案。"
    english = build_cot([{"query": "What is 38 plus 49", "response": "87"}], generator(lambda t, _: "So 87."))
    assert english.rows[0]["prompt"].startswith("What is 38 plus 49. Please output the reason first")


def test_a_reply_in_another_language_than_the_template_is_rejected():
    english = "38 plus 49 is 87. So the answer is 87."
    result = build_cot([{"query": "38加49等于多少？", "response": "87"}], generator(lambda t, _: english), lang="zh")
    assert reasons(result) == {"0": "wrong language"} and "asks for Chinese" in result.rejects[0].detail
    chinese = "先算三十八加四十九，所以答案是87。"
    result = build_cot([{"query": "What is 38 plus 49?", "response": "87"}], generator(lambda t, _: chinese))
    assert reasons(result) == {"0": "wrong language"} and "asks for English" in result.rejects[0].detail
    mixed = "先算 38 + 49 = 87（using column addition），所以答案是87。"  # English terms in a Chinese reply are fine
    result = build_cot([{"query": "38加49等于多少？", "response": "87"}], generator(lambda t, _: mixed), lang="zh")
    assert not result.rejects


# ------------------------------------------------------------------------------------------------- clarify


def test_clarify_outputs_clarification_and_positive():
    reply = "Requirements:\n1. Form a phrase of two words.\n2. The first word starts with K.\n3. The second with S."
    gen = generator(lambda text, _: reply)
    rows = [{"id": "ks", "query": "Initials K and S, compose a phrase.", "response": "Kind soul", "task": "words"}]
    result = build_clarify(rows, gen)
    assert "Initials K and S, compose a phrase." in user_text(gen, "ks/clarify")
    clarification, positive = result.rows
    clarified = (
        "Initials K and S, compose a phrase.\nRequirements:\n1. Form a phrase of two words.\n"
        "2. The first word starts with K.\n3. The second with S."
    )
    assert clarification["kind"] == "clarification" and clarification["id"] == "ks/clarify/clarification"
    assert clarification["prompt"].startswith("[Input]: 'Initials K and S, compose a phrase.' The [input] is a")
    assert "clearer" in clarification["prompt"]
    assert clarification["completion"] == " " + clarified
    assert (positive["kind"], positive["prompt"], positive["completion"]) == ("positive", clarified, " Kind soul")
    assert positive["task"] == clarification["task"] == "words"


def test_clarify_rejects_a_reply_without_a_list():
    result = build_clarify(REFS[:1], generator(lambda text, _: "The question is already clear."))
    assert result.rows == [] and reasons(result) == {"add": "not a list"}
    assert result.rejects[0].stage == "parse"


# ------------------------------------------------------------------------------------------------ evaluate

PASS = "First, the requirements: a number. Next, the output gives 87. Thus, the output meets all the requirements of the input."  # noqa: E501
FAIL = "First, the requirements: the sum. Next, 88 is wrong. Thus, the output does not meet all the requirements of the input."  # noqa: E501


def test_evaluate_positive_and_negative_responses():
    rows = [{"id": "add", "query": "What is 38 plus 49?", "response": "87", "negative_response": "88", "task": "m"}]
    gen = generator(lambda text, _: FAIL if "Reply:\n88" in text else PASS)
    result = build_evaluate(rows, gen)
    assert [r["id"] for r in result.rows] == ["add/evaluate", "add/evaluate/negative"]
    assert [r["label"] for r in result.rows] == ["pos", "neg"]
    assert "Thus, the output meets all the requirements of the input." in user_text(gen, "add/evaluate")
    assert "does not meet" in user_text(gen, "add/evaluate/negative")  # the verdict to reach goes with the request
    prompt = result.rows[1]["prompt"]
    assert prompt.startswith("The [input] holds a question that a user put to a dialogue system")
    assert prompt.endswith("[Input]: What is 38 plus 49?\n[Output]: 88")
    assert result.rows[1]["completion"] == " " + FAIL


def test_evaluate_reads_trl_preference_rows():
    """TRL's preference forms: prompt/chosen/rejected as text or chat, and chosen/rejected conversations that hold
    the prompt; chosen is judged as meeting the requirements, rejected as not. A text row without a prompt column
    has no question to judge against and is refused by name."""
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    bot = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = [
        {"id": "text", "prompt": "What is 38 plus 49?", "chosen": " 87", "rejected": " 88"},
        {"id": "chat", "prompt": user("What is 38 plus 49?"), "chosen": bot("87"), "rejected": bot("88")},
        {"id": "implicit", "chosen": [*user("What is 38 plus 49?"), *bot("87")],
         "rejected": [*user("What is 38 plus 49?"), *bot("88")]},
        {"id": "no-prompt", "chosen": "What is 38 plus 49? 87", "rejected": "What is 38 plus 49? 88"},
        {"id": "two-prompts", "chosen": [*user("What is 38 plus 49?"), *bot("87")],
         "rejected": [*user("What is 38 plus 50?"), *bot("88")]},
        {"id": "own-response", "query": "What is 2 plus 2?", "response": "4", "prompt": "x", "chosen": "y",
         "rejected": "z"},
    ]  # fmt: skip
    gen = generator(lambda text, _: FAIL if "Reply:\n88" in text else PASS)
    result = build_evaluate(rows, gen)
    ids = ["text", "chat", "implicit"]
    assert [r["id"] for r in result.rows] == [*(f"{i}/evaluate{s}" for i in ids for s in ("", "/negative")),
                                              "own-response/evaluate"]  # fmt: skip
    assert [r["label"] for r in result.rows] == ["pos", "neg"] * 3 + ["pos"]
    assert {r["prompt"] for r in result.rows[1:6:2]} == {result.rows[1]["prompt"]}
    assert result.rows[1]["prompt"].endswith("[Input]: What is 38 plus 49?\n[Output]: 88")
    assert result.rows[-1]["prompt"].endswith("[Input]: What is 2 plus 2?\n[Output]: 4")  # its own, no 'z'
    assert reasons(result) == {"no-prompt": "missing field", "two-prompts": "bad value"}
    details = {r.source_id: r.detail for r in result.rejects}
    assert "without a 'prompt' column needs chosen/rejected conversations" in details["no-prompt"]
    assert "start with different user messages" in details["two-prompts"]


def test_evaluate_rejects_contradicting_or_missing_verdicts():
    rows = [
        {"id": "a", "query": "q1", "response": "r1", "label": "pos"},
        {"id": "b", "query": "q2", "response": "r2", "label": "negative"},
        {"id": "c", "query": "q3", "response": "r3", "label": 0},
        {"id": "d", "query": "q4", "response": "r4", "label": "maybe"},
    ]
    replies = {"q1": FAIL, "q2": FAIL, "q3": "The output meets all the requirements of the input. Mostly."}
    result = build_evaluate(rows, generator(lambda text, _: next(v for k, v in replies.items() if k in text)))
    assert [r["id"] for r in result.rows] == ["b/evaluate"]
    assert reasons(result) == {"a": "verdict contradicts label", "c": "no verdict", "d": "bad value"}


# ------------------------------------------------------------------------------------------------- similar


def test_similar_parses_strictly():
    rows = [{"id": "a", "query": "What is 38 plus 49?", "response": "87", "task": "math"},
            {"id": "b", "query": "What is 2 plus 2?", "response": "4", "task": "math"},
            {"id": "c", "query": "What is 5 plus 5?", "response": "10", "task": "math"}]  # fmt: skip
    replies = {"38 plus 49": "Query: What is 21 plus 35?\nResponse: 56",
               "2 plus 2": "Here is one!\nQuery: What is 3 plus 3?\nResponse: 6",
               "5 plus 5": "Query: what is 5 plus 5\nResponse: 10"}  # fmt: skip
    gen = generator(lambda text, _: next(v for k, v in replies.items() if k in text))
    result = build_similar(rows, gen)
    assert [(r["id"], r["prompt"], r["completion"], r["task"]) for r in result.rows] == [
        ("a/similar", "What is 21 plus 35?", " 56", "math")
    ]
    assert reasons(result) == {"b": "malformed reply", "c": "identical to source"}


# ------------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["prompt-completion", "conversational", "messages"])
def test_output_formats_load_as_probe_sets(fmt):
    reply = "1. Give a number.\n2. Add the two numbers."
    result = build_clarify(REFS, generator(lambda text, _: reply), fmt=fmt)
    example_set = load_set("clarify", result.rows)
    assert len(example_set) == 6 and example_set.has_tasks
    assert example_set.format == ("messages" if fmt == "messages" else "prompt_completion")
    if fmt == "messages":
        assert [m["role"] for m in result.rows[0]["messages"]] == ["user", "assistant"]
    dataset = result.to_dataset()
    assert dataset.num_rows == 6 and "template_version" in dataset.column_names


def test_templates_can_be_overridden_through_the_api():
    override = {"version": 2, "name": "terse", "templates": {"cot": {"user": "Q: {query}\nRef: {response}"}}}
    gen = generator(lambda text, _: "Because. So the answer is 87.")
    result = build_cot(REFS[:1], gen, templates=override)
    assert user_text(gen, "add/cot") == "Q: What is 38 plus 49?" + DIRECTIVE + "\nRef: 87"
    assert result.rows[0]["template_version"] == "swift-study-builders@1+terse@2"
    assert build_cot(REFS[:1], gen, templates=load_templates("en")).rows[0]["template_version"].endswith("@1")


def test_a_truncated_reply_is_rejected_even_when_it_parses():
    from dataclasses import replace

    class Truncating(ScriptedBackend):
        def generate(self, requests):
            for result in super().generate(requests):
                yield replace(result, finish_reasons=["length"] * len(result.texts))

    gen = Generator(Truncating(lambda req: "38 plus 49 is 87. So the answer is 87."), None, progress=False)
    result = build_cot(REFS[:1], gen)
    assert result.rows == [] and reasons(result) == {"add": "truncated reply"}
    assert result.rejects[0].stage == "parse"
