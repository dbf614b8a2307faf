"""Each ScaleQuest stage's data-in/data-out contract on small inputs, with scripted generation backends.

The contract: ``<output>``, ``<output stem>.rejects.jsonl`` and ``<output stem>.stats.json`` are written; every
input row ends up exactly once in the output or the rejects; every drop is counted by reason in the stats; the
stats balance (``rows_in == rows_out + dropped`` in the stage's unit).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from doubles import ScriptedBackend

from swift_callbacks.builders.scalequest import (
    DEFAULT_PROMPTS,
    DecontaminateSettings,
    DifficultySettings,
    EvalSet,
    GenerateSettings,
    QftDataSettings,
    QpoPairsSettings,
    RespondSettings,
    Sampling,
    ScorerSettings,
    StageError,
    chat_prefix,
    decontaminate,
    difficulty,
    filter_language,
    filter_solvable,
    generate_questions,
    qft_data,
    qpo_pairs,
    respond,
    reward_select,
    training_prompt,
)
from swift_callbacks.builders.scalequest.contract import load_stats
from swift_callbacks.builders.scalequest.stages.qpo import choose_aspect
from swift_callbacks.generation import Generator

EOS = "<|endoftext|>"


# ------------------------------------------------------------------------------------------------ helpers


def write_jsonl(path: Path, rows: list, raw_lines: tuple[str, ...] = ()) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in raw_lines)
    path.write_text(text, encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def outputs(output: Path) -> tuple[list[dict], list[dict], dict]:
    """Rows, rejects and stats of a finished stage (each file must exist)."""
    stem = output.stem if output.suffix == ".jsonl" else output.name
    rejects = read_jsonl(output.with_name(f"{stem}.rejects.jsonl"))
    stats = json.loads(output.with_name(f"{stem}.stats.json").read_text())
    rows = read_jsonl(output) if output.suffix == ".jsonl" else []
    return rows, rejects, stats


def check_contract(output: Path, input_ids: list[str] | None = None, *, id_key: str = "id") -> tuple[list, list, dict]:
    rows, rejects, stats = outputs(output)
    assert stats["complete"] is True and stats["fingerprint"]
    assert stats["rows_out"] == len(rows)
    assert sum(stats["dropped"].values()) == len(rejects)
    assert stats["rows_in"] == stats["rows_out"] + sum(stats["dropped"].values())
    for reject in rejects:
        assert set(reject) == {"source_id", "stage", "reason", "detail", "row"}
        assert f"{reject['stage']}: {reject['reason']}" in stats["dropped"]
    if input_ids is not None:
        kept, dropped = [r[id_key] for r in rows], [r["source_id"] for r in rejects]
        assert sorted(kept + dropped) == sorted(input_ids), "every input row exactly once in output or rejects"
    return rows, rejects, stats


def generator(reply, tmp_path: Path, name: str = "scripted") -> Generator:
    return Generator(ScriptedBackend(reply, model=name), tmp_path / "cache", progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    from swift_callbacks.assets import tiny

    return tiny.build_tokenizer(tiny.demo_corpus())


QUESTIONS = [
    {"id": "a", "question": "Mia has 12 stickers and buys 7 more. How many stickers does she have?"},
    {"id": "b", "question": "Tom has 9 apples and eats 4 of them. How many apples are left?"},
    {"id": "c", "question": "Some words without any numbers?"},
    {"id": "d", "question": "There are 6 boxes with 8 pens in each box. How many pens are there?"},
]


# ------------------------------------------------------------------------------------------------ qft-data


def test_qft_data_writes_prompt_completion_rows_with_eos(tmp_path, tokenizer):
    rows = [*QUESTIONS, {"id": "e", "question": "   "}, {"id": "f", "problem": "no question column"},
            {"id": "g", "question": " Mia has 12 stickers and  buys 7 more. How many stickers does she have? "},
            {"id": "h", "question": 5}]  # fmt: skip
    source = write_jsonl(tmp_path / "seed.jsonl", rows, raw_lines=("{not json",))
    result = qft_data(source, tmp_path / "qft-data.jsonl", tokenizer=tokenizer)
    out, _rejects, stats = check_contract(tmp_path / "qft-data.jsonl", [*"abcdefgh", "8"])
    assert [r["id"] for r in out] == ["a", "b", "c", "d"]
    for row, seed in zip(out, QUESTIONS, strict=True):
        assert row["prompt"] == "<|im_start|>user\n"  # the chat prefix up to the user turn, nothing else
        assert row["completion"] == seed["question"] + EOS  # the question, then the EOS text
        assert row["question"] == seed["question"]
    assert stats["dropped"] == {"read: invalid JSON": 1, "validate: duplicate question": 1,
                                "validate: empty question": 1, "validate: field 'question' is not text": 1,
                                "validate: missing field 'question'": 1}  # fmt: skip
    assert stats["metrics"]["eos_token"] == EOS and result.stats.rows_out == 4


def test_qft_data_reads_another_question_column(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "math.jsonl", [{"problem": "What is 2 + 3?", "solution": "\\boxed{5}"}])
    settings = QftDataSettings(question_field="problem", system_prompt="Write one problem.")
    result = qft_data(source, tmp_path / "out.jsonl", tokenizer=tokenizer, settings=settings)
    (row,) = result.rows
    assert row["id"] == "0"  # no id column: the position
    assert row["prompt"] == "<|im_start|>system\nWrite one problem.<|im_end|>\n<|im_start|>user\n"


class _BosTokenizer:
    """A tokenizer that adds BOS itself and whose chat template writes it too (Llama-style)."""

    chat_template = "x"
    bos_token, bos_token_id, eos_token = "<s>", 1, "</s>"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "<s>" + "".join(f"[{m['role']}] {m['content']} [/{m['role']}]" for m in messages)

    def __call__(self, text):
        return {"input_ids": [1, 7]}


def test_chat_prefix_and_bos_handling():
    tok = _BosTokenizer()
    prefix = chat_prefix(tok)
    assert prefix == "<s>[user] "
    assert training_prompt(tok, prefix) == "[user] "  # TRL's tokenization adds the BOS back: one BOS, not two
    with pytest.raises(StageError, match="chat template"):
        chat_prefix(type("NoTemplate", (), {"chat_template": None})())


# ------------------------------------------------------------------------------------------------ generate


def test_generate_samples_from_the_prefix_only(tmp_path):
    def reply(req):
        assert req.prompt == "<|im_start|>user\n" and req.messages == ()  # raw prefix, no chat template
        if req.key == "gen-000002":
            raise RuntimeError("backend down")
        return [f" question {req.key} #{k}? " for k in range(req.params.n - 1)] + [""]

    gen = generator(reply, tmp_path)
    settings = GenerateSettings(num_questions=10, samples_per_request=4, seed=3)
    generate_questions(tmp_path / "generate.jsonl", generator=gen, prefix="<|im_start|>user\n", settings=settings)
    rows, _rejects, stats = check_contract(tmp_path / "generate.jsonl")
    calls = gen.backend.calls
    assert [c.params.n for c in calls] == [4, 4, 2]  # 10 questions in requests of at most 4
    assert len({c.params.seed for c in calls}) == 3  # distinct seeds, so distinct samples
    assert all((c.params.temperature, c.params.top_p, c.params.max_tokens) == (1.0, 0.99, 512) for c in calls)
    assert len(rows) == 8 and rows[0] == {"id": "gen-000000-000", "question": "question gen-000000 #0?",
                                          "generator": "scripted"}  # fmt: skip
    assert rows[3]["question"] == ""  # empty samples are kept: filter-language drops and counts them
    assert stats["dropped"] == {"generate: generation failed": 2}
    assert stats["rows_in"] == 10 and stats["metrics"]["empty_questions"] == 2


def test_generate_refuses_a_chat_only_backend(tmp_path):
    class ChatOnly:
        name, model = "chat-only", "m"

        def generate(self, requests):
            raise AssertionError("must not be called")

    with pytest.raises(StageError, match="raw chat prefix"):
        generate_questions(tmp_path / "g.jsonl", generator=Generator(ChatOnly(), None, progress=False), prefix="p")


# ------------------------------------------------------------------------------------------------ filters


def test_filter_language(tmp_path):
    rows = [{"id": "1", "question": "  How many?  "}, {"id": "2", "question": ""}, {"id": "3", "question": " \n "},
            {"id": "4", "question": "Combien coûte-t-il?"}, {"id": "5", "question": "几个？"}, {"id": "6"}]  # fmt: skip
    filter_language(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    out, _rejects, stats = check_contract(tmp_path / "out.jsonl", list("123456"))
    assert out == [{"id": "1", "question": "How many?"}]
    assert stats["dropped"] == {"filter: empty question": 2, "filter: non-ASCII characters": 2,
                                "validate: missing field 'question'": 1}  # fmt: skip
    assert stats["kept_ratio"] == pytest.approx(1 / 6)
    assert stats["dropped_ratio"]["filter: empty question"] == pytest.approx(2 / 6)


JUDGE_REPLIES = {
    "a": "It gives both numbers.\nYes",
    "b": "At first glance, yes. But the count of eaten apples is unclear.\nNo",  # "yes" mid-text, final No
    "c": "Yes, this looks solvable to me.",  # a hedged line, not a verdict: rejected, never kept
    "d": "FAIL",
}


def test_filter_solvable_parses_the_final_verdict_strictly(tmp_path):
    def reply(req):
        content = req.messages[-1][1]
        row = next(r for r in QUESTIONS if r["question"] in content)
        assert content == DEFAULT_PROMPTS.solvability_judge.replace("{question}", row["question"])
        if JUDGE_REPLIES[row["id"]] == "FAIL":
            raise RuntimeError("timeout")
        return JUDGE_REPLIES[row["id"]]

    filter_solvable(write_jsonl(tmp_path / "in.jsonl", QUESTIONS), tmp_path / "out.jsonl",
                    judge=generator(reply, tmp_path))  # fmt: skip
    out, rejects, stats = check_contract(tmp_path / "out.jsonl", list("abcd"))
    assert [r["id"] for r in out] == ["a"]
    reasons = {r["source_id"]: f"{r['stage']}: {r['reason']}" for r in rejects}
    assert reasons == {
        "b": "check: judged unsolvable",
        "c": "parse: no final verdict",
        "d": "generate: generation failed",
    }
    assert stats["metrics"]["verdicts"] == {"yes": 1, "no": 1, "none": 1, "failed": 1}
    assert stats["metrics"]["solvable_ratio"] == 0.5  # yes / (yes + no)
    assert stats["generation"]["judge"]["requests"] == 4


# ------------------------------------------------------------------------------------------------ qpo-pairs

SAMPLES = ["Mia has 12 stickers. How many?", "", "Tom has 9 apples. How many are left?", "Cats?", "Sam has 3 pens.",
           "Same one?"]  # fmt: skip
REWRITES = {
    "Mia has 12 stickers. How many?": "Plan: add a step.\nFinal question: Mia has 12 stickers and buys 7. How many?",
    "Tom has 9 apples. How many are left?": "Solve...\n**Final question:** Tom has 9 apples and eats 4. How many left?",
    "Cats?": "Methods: ...\nFinal question:",  # empty rewrite
    "Sam has 3 pens.": "I cannot rewrite this.",  # no final marker
    "Same one?": "Checked.\nFinal question: Same one?",  # identical to the original
}


def test_qpo_pairs_builds_dpo_pairs_from_rewrites(tmp_path):
    def sample(req):
        assert req.is_completion
        return SAMPLES[: req.params.n]

    def rewrite(req):
        content = req.messages[-1][1]
        original = next(q for q in REWRITES if f"<<<\n{q}\n>>>" in content)
        return REWRITES[original]

    rewriter = generator(rewrite, tmp_path, "rewriter")
    settings = QpoPairsSettings(num_questions=6, samples_per_request=6, seed=7, solvability_probability=0.5)
    qpo_pairs(tmp_path / "pairs.jsonl", sampler=generator(sample, tmp_path, "qft"), rewriter=rewriter,
              prefix="<|im_start|>user\n", prompt="<|im_start|>user\n", eos_token=EOS, settings=settings)  # fmt: skip
    pairs, _rejects, stats = check_contract(tmp_path / "pairs.jsonl", [f"qpo-000000-{k:03d}" for k in range(6)])
    assert len(pairs) == 2
    for pair in pairs:
        original = SAMPLES[int(pair["id"][-3:])]
        rewrite = REWRITES[original].split("Final question:")[-1].strip(" *")
        assert pair["prompt"] == "<|im_start|>user\n"  # the chat prefix only
        assert pair["chosen"] == rewrite + EOS and pair["rewrite"] == rewrite  # rewritten = chosen
        assert pair["rejected"] == original + EOS and pair["original"] == original  # original = rejected
        assert pair["aspect"] == choose_aspect(7, pair["id"], 0.5)
    # The rewrite prompt follows the aspect drawn for each question.
    for call in rewriter.backend.calls:
        aspect = choose_aspect(7, call.key, 0.5)
        template = (
            DEFAULT_PROMPTS.solvability_rewrite if aspect == "solvability" else DEFAULT_PROMPTS.difficulty_rewrite
        )
        assert call.messages[-1][1].startswith(template.split("{question}")[0])
    assert stats["dropped"] == {"check: empty rewrite": 1, "check: rewrite identical to original": 1,
                                "generate: empty sample": 1, "parse: no final marker": 1}  # fmt: skip
    assert sum(stats["metrics"]["aspects_drawn"].values()) == 5 and stats["rows_in"] == 6


def test_aspect_choice_is_seeded_and_mixed():
    draws = [choose_aspect(0, f"q{i}", 0.5) for i in range(200)]
    assert draws == [choose_aspect(0, f"q{i}", 0.5) for i in range(200)]
    assert 60 < draws.count("solvability") < 140
    assert {choose_aspect(1, "q", 1.0), choose_aspect(2, "q", 0.0)} == {"solvability", "difficulty"}


# ------------------------------------------------------------------------------------------------ respond


def _solutions(req):
    """Sample k of question a/b/d: wrong for k == 1, no box for k == 2; 'c' never answers."""
    content = req.messages[-1][1]
    assert content.endswith("write the final answer inside \\boxed{}.")
    if "without any numbers" in content:
        return ["I do not know."] * req.params.n
    return [
        f"Steps.\nSo \\boxed{{{'1' if k == 1 else '2'}}}." if k != 2 else "Steps, no box." for k in range(req.params.n)
    ]


def test_respond_keeps_samples_with_a_final_boxed_answer(tmp_path):
    source = write_jsonl(tmp_path / "q.jsonl", [*QUESTIONS, {"id": "x"}])
    respond(source, tmp_path / "r.jsonl", responder=generator(_solutions, tmp_path), settings=RespondSettings(n=4))
    rows, _rejects, stats = check_contract(tmp_path / "r.jsonl")
    assert stats["rows_in"] == 5 * 4 and stats["unit"] == "samples"
    assert len(rows) == 3 * 3  # a, b, d keep 3 of 4 samples each
    assert {r["answer"] for r in rows} == {"1", "2"}
    assert rows[0]["id"] == "a/0" and rows[0]["question_id"] == "a" and rows[0]["sample_index"] == 0
    assert stats["dropped"] == {"check: no final boxed answer": 3 + 4, "validate: missing field 'question'": 4}
    assert stats["metrics"]["answer_presence_ratio"] == pytest.approx(9 / 16)
    assert stats["metrics"]["questions_without_an_answer"] == 1
    assert RespondSettings().sampling == Sampling(temperature=0.7, top_p=0.95, max_tokens=2048)  # the paper's


# ------------------------------------------------------------------------------------------------ reward-select


def test_reward_select_keeps_the_best_response_per_question(tmp_path):
    rows = [
        {"id": "a/0", "question_id": "a", "question": "Q a", "response": "short \\boxed{1}", "answer": "1",
         "sample_index": 0},
        {"id": "a/1", "question_id": "a", "question": "Q a", "response": "best \\boxed{2}", "answer": "2",
         "sample_index": 1},
        {"id": "b/0", "question_id": "b", "question": "Q b", "response": "tie \\boxed{3}", "answer": "3",
         "sample_index": 0},
        {"id": "b/1", "question_id": "b", "question": "Q b", "response": "tie too \\boxed{3}", "answer": "3",
         "sample_index": 1},
        {"id": "c/0", "question_id": "c", "question": "Q c", "response": "broken", "answer": "4", "sample_index": 0},
    ]  # fmt: skip
    scores = {"short \\boxed{1}": "0.1", "best \\boxed{2}": "0.9", "tie \\boxed{3}": "0.5",
              "tie too \\boxed{3}": "0.5", "broken": "not a number"}  # fmt: skip

    def score(req):
        assert [r for r, _ in req.messages] == ["user", "assistant"]
        return scores[req.messages[1][1]]

    reward_select(write_jsonl(tmp_path / "r.jsonl", rows), tmp_path / "best.jsonl", scorer=generator(score, tmp_path))
    out, rejects, stats = check_contract(tmp_path / "best.jsonl")
    assert [(r["id"], r["response_id"], r["reward"], r["candidates"]) for r in out] == [("a", "a/1", 0.9, 2),
                                                                                    ("b", "b/0", 0.5, 2)]  # fmt: skip
    assert out[0]["messages"] == [
        {"role": "user", "content": "Q a"},
        {"role": "assistant", "content": "best \\boxed{2}"},
    ]
    reasons = {r["source_id"]: r["reason"] for r in rejects}
    assert reasons == {"a/0": "not the best response", "b/1": "not the best response", "c/0": "score is not a number"}
    assert stats["metrics"]["reward_all"] == {"count": 4, "min": 0.1, "median": 0.5, "max": 0.9, "mean": 0.5}
    assert stats["metrics"]["reward_selected"]["mean"] == pytest.approx(0.7)


# ------------------------------------------------------------------------------------------------ difficulty


def test_difficulty_labels_and_drops_the_easiest_with_a_pretrained_scorer(tmp_path):
    questions = [{"id": f"q{i}", "question": f"Ann has {n} pens and buys {n + 1} more. How many pens?"}
                 for i, n in enumerate([1, 40, 300, 7, 2000])]  # fmt: skip
    source = write_jsonl(tmp_path / "q.jsonl", questions)
    settings = DifficultySettings(drop_easiest_fraction=0.4, scorer=ScorerSettings(train=False))
    result = difficulty(source, tmp_path / "d.jsonl", solver=None, scorer_model="scripted:arithmetic",
                        cache_dir=tmp_path / "cache", settings=settings)  # fmt: skip
    rows, rejects, stats = check_contract(tmp_path / "d.jsonl", [q["id"] for q in questions])
    assert [r["id"] for r in rows] == ["q1", "q2", "q4"]  # input order kept; the two smallest numbers dropped
    assert {r["source_id"] for r in rejects} == {"q0", "q3"}
    assert all(r["reason"] == "among the easiest" for r in rejects)
    assert stats["metrics"]["dropped_easiest"] == 2 and sum(stats["metrics"]["predicted_histogram"]["counts"]) == 5
    assert result.rows[0]["difficulty"] > 0


def test_difficulty_trains_a_regression_scorer_on_fail_rates(tmp_path):
    """Fail rates from a scripted solver against reference answers, a tiny transformers regression scorer."""
    questions = [{"id": f"q{i}", "question": f"Ann has {i} pens and buys 2 more. How many pens?", "answer": str(i + 2)}
                 for i in range(8)]  # fmt: skip
    questions.append({"id": "q8", "question": "Ann has pens. How many?", "answer": None})  # no reference: no label

    def solve(req):
        match = re.search(r"has (\d+) pens", req.messages[-1][1])
        if match is None:
            return ["\\boxed{5}"] * req.params.n
        count = int(match.group(1))
        right = count + 2 if count != 1 else -1  # the solver always gets "has 1" wrong, the others half the time
        return [f"\\boxed{{{right if k < req.params.n // 2 else 0}}}" for k in range(req.params.n)]

    settings = DifficultySettings(samples=4, answer_field="answer", drop_easiest_fraction=0.25, bins=4, seed=0,
                                  scorer=ScorerSettings(max_length=32, training={
                                      "max_steps": 3, "learning_rate": 1e-3, "use_cpu": True, "seed": 0,
                                      "per_device_train_batch_size": 4, "disable_tqdm": True}))  # fmt: skip
    kwargs = dict(solver=generator(solve, tmp_path), scorer_model="tiny:hidden_size=32,num_layers=1,seed=0",
                  cache_dir=tmp_path / "cache", settings=settings)  # fmt: skip
    difficulty(write_jsonl(tmp_path / "q.jsonl", questions), tmp_path / "d.jsonl", **kwargs)
    rows, rejects, stats = check_contract(tmp_path / "d.jsonl", [q["id"] for q in questions])
    metrics = stats["metrics"]
    assert metrics["labelled"] == 8 and metrics["unlabelled"] == {"generation failed": 0, "no reference answer": 1}
    assert metrics["reference"] == "answer_field"
    assert metrics["fail_rate"]["mean"] == pytest.approx((0.5 * 7 + 1.0) / 8)  # "has 1" is always wrong
    assert metrics["fail_rate_histogram"]["counts"] == [0, 0, 7, 1]
    assert metrics["scorer"]["reused"] is False and metrics["scorer"]["global_step"] == 3
    assert (tmp_path / "d.scorer" / "config.json").is_file()
    assert len(rows) == 7 and len(rejects) == 2  # floor(0.25 * 9) easiest dropped
    assert {r["fail_rate"] for r in rows} <= {0.5, 1.0, None}
    # Rerun: labels come from the cache and the trained scorer is reused.
    difficulty(write_jsonl(tmp_path / "q.jsonl", questions), tmp_path / "d.jsonl", **kwargs)
    assert load_stats(tmp_path / "d.jsonl").metrics["scorer"]["reused"] is True


# ------------------------------------------------------------------------------------------------ decontaminate


def test_decontaminate_drops_rows_sharing_a_13_gram(tmp_path):
    eval_rows = [
        {"id": "e1", "question": "A farmer has 17 sheep and all but 9 run away. How many sheep does the farmer have?"},
        {"id": "e2", "question": "What is 15 plus 27?"},
    ]
    eval_path = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    rows = [
        {"id": "r1", "question": "Today a farmer has 17 sheep and all but 9 run away; how many sheep does he keep?"},
        {"id": "r2", "question": "What is 15 plus 27?"},
        {"id": "r3", "question": "What is 15 plus 27 minus 2?"},
        {"id": "r4", "question": "A farmer has 17 goats."},
    ]  # fmt: skip
    settings = DecontaminateSettings(eval_sets=[EvalSet(str(eval_path), ["question"], "tiny")])
    decontaminate(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", settings=settings)
    out, rejects, stats = check_contract(tmp_path / "out.jsonl", ["r1", "r2", "r3", "r4"])
    assert [r["id"] for r in out] == ["r3", "r4"]
    assert {r["source_id"]: r["reason"] for r in rejects} == {"r1": "contaminated: tiny", "r2": "contaminated: tiny"}
    assert "item 'e1'" in rejects[0]["detail"]
    assert stats["metrics"]["contamination_ratio"] == 0.5 and stats["metrics"]["contaminated_by_set"] == {"tiny": 2}
    with pytest.raises(StageError, match="at least one evaluation set"):
        decontaminate(tmp_path / "in.jsonl", tmp_path / "x.jsonl", settings=DecontaminateSettings())


# ------------------------------------------------------------------------------------------------ reruns


def test_a_rerun_answers_from_the_cache_and_writes_the_same_output(tmp_path):
    source = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    first = generator(_solutions, tmp_path)
    respond(source, tmp_path / "r.jsonl", responder=first)
    before = (tmp_path / "r.jsonl").read_bytes()
    again = generator(_solutions, tmp_path)
    respond(source, tmp_path / "r.jsonl", responder=again)
    assert again.backend.calls == [] and again.last_stats.cached == len(QUESTIONS)
    assert (tmp_path / "r.jsonl").read_bytes() == before


# ------------------------------------------------------------------------------------------------ backends


def test_filter_solvable_and_respond_reject_truncated_replies(tmp_path):
    from dataclasses import replace

    class Truncating(ScriptedBackend):  # reports every reply as cut at max_tokens, as a server would
        def generate(self, requests):
            for result in super().generate(requests):
                yield replace(result, finish_reasons=["length"] * len(result.texts))

    rows = write_jsonl(tmp_path / "in.jsonl", QUESTIONS[:1])
    judge = Generator(Truncating(lambda req: "<think>Is it solvable?\nYes"), tmp_path / "cache", progress=False)
    filter_solvable(rows, tmp_path / "solvable.jsonl", judge=judge)
    out, rejects, _ = check_contract(tmp_path / "solvable.jsonl", ["a"])
    assert out == [] and [r["reason"] for r in rejects] == ["truncated reply"]

    responder = Generator(Truncating(lambda req: "Try 12 - 5 = 7, so \\boxed{7}. Hmm, but"), None, progress=False)
    respond(rows, tmp_path / "respond.jsonl", responder=responder, settings=RespondSettings(n=1))
    out, rejects, _ = check_contract(tmp_path / "respond.jsonl", id_key="question_id")
    assert out == [] and [r["reason"] for r in rejects] == ["truncated reply"]

    questions = Generator(Truncating(lambda req: ["How many apples does Tom have if he"] * req.params.n), None,
                          progress=False)  # fmt: skip
    generate_questions(tmp_path / "generate.jsonl", generator=questions, prefix="<|im_start|>user\n",
                       settings=GenerateSettings(num_questions=3, samples_per_request=3, seed=1))  # fmt: skip
    out, rejects, _ = check_contract(tmp_path / "generate.jsonl")
    assert out == [] and [r["reason"] for r in rejects] == ["truncated reply"] * 3  # the same name everywhere
