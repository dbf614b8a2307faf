"""Evaluation: answer reading, rows, prompts as TRL tokenizes them, generation and option likelihoods against a
brute-force computation on several model families, run folders and LoRA checkpoints, resumable records, an LLM
judge over real HTTP, and the command's one-line errors."""

from __future__ import annotations

import json
import re

import helpers
import pytest
import torch
import transformers as tf
from test_architectures import _decoder

from swift_callbacks.answers import final_answer, same_answer
from swift_callbacks.cli import main as cli_main
from swift_callbacks.configuration import ConfigError
from swift_callbacks.evaluation import (
    EvalSetConfig,
    EvaluateConfig,
    JudgeConfig,
    RecordError,
    evaluate,
    evaluate_config,
    paired_difference,
    read_examples,
    wilson_interval,
)
from swift_callbacks.evaluation import run as eval_run
from swift_callbacks.evaluation.examples import EvalExample
from swift_callbacks.evaluation.inference import generate, option_ids, prompt_ids, sequence_logprobs
from swift_callbacks.models import ModelConfig
from swift_callbacks.sets import SetError

TINY = "tiny:hidden_size=64,num_layers=2,seed=0"  # the model helpers.build_model() builds


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------ reading answers


@pytest.mark.parametrize(
    "reply, answer",
    [
        ("87", "87"),
        (" 38 plus 49 makes 87. So the answer is 87.", "87"),
        ("Natalia sold 48 clips.\n#### 72", "72"),
        ("so \\boxed{\\frac{1}{2}} it is", "\\frac{1}{2}"),
        ("step one\nThe final answer is **1,000**. Done.", "1,000"),
        ("<think>maybe 3</think>Answer: B", "B"),
        ("step one\nstep two gives 5", None),  # several lines, no marker: no answer, never a guess
        ("<think>never closed 5", None),
        ("Adding up.\n**Answer:** 72", "72"),  # Markdown around the marker
        ("Adding up.\n- **Final Answer**: 72", "72"),
        ("The answer is 72. Wait, no: the answer is 73.", "73"),  # the last statement, even on one line
    ],
)
def test_final_answer_reads_markers_strictly(reply, answer):
    assert final_answer(reply) == answer


def test_last_number_fallback_and_answer_equality():
    assert final_answer("step one\nstep two gives 5", last_number=True) == "5"
    assert final_answer("step one\nso 12, then 23, done", last_number=True) == "23"  # not "23,"
    assert final_answer("step one\npages 10-12", last_number=True) == "12"  # not -12
    assert final_answer("step one\nx = -5", last_number=True) == "-5"
    assert same_answer("\u22123", "-3")  # the Unicode minus sign
    assert same_answer("1,000", "1000") and same_answer("87.0", "87") and same_answer("0.5", "\\frac{1}{2}")
    assert same_answer("b", "B") and same_answer("4 5 6", "4 5 6")
    assert not same_answer(None, "87") and not same_answer("187", "87") and not same_answer("", "")


# --------------------------------------------------------------------------------------------------- rows


def test_rows_of_every_shape_become_examples(tmp_path):
    rows = [
        {"id": "a", "task": "add", "prompt": "What is 1 plus 2?", "completion": " 3", "answer": "3"},
        {"id": "b", "prompt": "Q", "completion": "She had 4.\n#### 72"},  # gold read from the completion
        {"id": "c", "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "42"}]},
        {"id": "d", "question": "2+2?", "answer": 4},
    ]
    examples = read_examples(EvalSetConfig("mixed", _write(tmp_path / "m.jsonl", rows)))
    assert [(e.id, e.task, e.gold) for e in examples] == [("a", "add", "3"), ("b", "all", "72"),
                                                           ("c", "all", "42"), ("d", "all", "4")]  # fmt: skip
    assert examples[2].prompt == (("user", "Hi?"),) and examples[2].completion == (("assistant", "42"),)
    choice_rows = [
        {"question": "Capital of France?", "choices": ["Rome", "Paris"], "answer": 1, "subject": "geo"},
        {"question": "Q2", "choices": "['x', 'y', 'z']", "answer": "C"},  # a list literal, as MMLU exports write it
        {"question": "Q3", "choices": ["x", "y"], "answer": "x"},
    ]
    choices = read_examples(EvalSetConfig("mc", _write(tmp_path / "c.jsonl", choice_rows), metric="choice"))
    assert [(e.gold, e.task, e.choices) for e in choices] == [
        ("B", "geo", ("Rome", "Paris")), ("C", "all", ("x", "y", "z")), ("A", "all", ("x", "y"))]  # fmt: skip
    assert choices[0].prompt == "Capital of France?\nA. Rome\nB. Paris\nAnswer:"


@pytest.mark.parametrize(
    "row, metric, message",
    [
        ({"text": "x"}, "exact_match", r"no prompt: give 'prompt'.*fields: \['text'\]"),
        ({"prompt": "Q", "completion": "a\nb"}, "exact_match", r"no 'answer' field, and no final"),
        ({"prompt": "Q"}, "exact_match", r"no gold answer: give an 'answer' field"),
        ({"prompt": ""}, "exact_match", r"'prompt' is empty"),
        ({"prompt": "Q", "answer": [1, 2]}, "exact_match", r"'answer' must be text or a number, got list"),
        ({"prompt": "Q", "answer": True}, "exact_match", r"'answer' must be text or a number, got bool"),
        ({"question": "Q", "choices": "nonsense", "answer": 0}, "choice", r"'choices' is text that is not a list"),
        ({"question": "Q", "choices": ["a", "b"], "answer": 2}, "choice", r"'answer' index 2 is outside the 2"),
        ({"question": "Q", "choices": ["a", "b"], "answer": "c"}, "choice", r"'answer' 'c' is not an index"),
        ({"question": "Q", "choices": ["a"], "answer": 0}, "choice", r"'choices' must be a list of at least two"),
        ({"question": "Q", "choices": ["1", "2"], "answer": "1"}, "choice", r"'answer' '1' is ambiguous"),
        (
            {"prompt": [{"role": "user", "content": None}], "answer": "5"},
            "exact_match",
            r"'prompt' message 0 has NoneType 'content'",
        ),
        ({"prompt": "Q", "answer": float("nan")}, "exact_match", r"'answer' is nan"),
        ({"prompt": "Q", "answer": "."}, "exact_match", r"the gold answer '\.' has nothing to compare with"),
        ({"question": "Q", "choices": ["a", ""], "answer": 0}, "choice", r"'choices' has an empty option \(option B\)"),
    ],
)
def test_bad_rows_are_named(tmp_path, row, metric, message):
    with pytest.raises(SetError, match=rf"Set 'bad', example '0': {message}"):
        read_examples(EvalSetConfig("bad", _write(tmp_path / "b.jsonl", [row]), metric=metric))


def test_a_damaged_parquet_file_is_named(tmp_path):
    path = tmp_path / "set.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(SetError, match=r"Set 'p': cannot read .*set.parquet"):
        read_examples(EvalSetConfig("p", str(path)))


# --------------------------------------------------------------------------- prompts as TRL tokenizes them


def test_prompt_ids_are_the_context_trl_trains_completions_after(tmp_path):
    from datasets import Dataset
    from trl import SFTTrainer

    tok = helpers.tokenizer()
    rows = [
        {"prompt": "What is 38 plus 49?", "completion": " 87"},
        {
            "prompt": [{"role": "user", "content": "Reverse gold."}],
            "completion": [{"role": "assistant", "content": "dlog"}],
        },
    ]
    for row in rows:
        trainer = SFTTrainer(model=helpers.build_model(), args=helpers.sft_config(tmp_path / "t"),
                             train_dataset=Dataset.from_list([row]), processing_class=tok)  # fmt: skip
        prepared = trainer.train_dataset[0]
        first_trained = next(i for i, label in enumerate(prepared["labels"]) if label != -100)
        trained_context = prepared["input_ids"][:first_trained]
        as_text = isinstance(row["prompt"], str)
        prompt = row["prompt"] if as_text else tuple((m["role"], m["content"]) for m in row["prompt"])
        completion = row["completion"] if as_text else tuple((m["role"], m["content"]) for m in row["completion"])
        example = EvalExample("x", "all", prompt, "g", completion=completion)
        assert prompt_ids(tok, example) == trained_context
        assert prompt_ids(tok, EvalExample("x", "all", prompt, "g"))[: len(trained_context)] == trained_context


def test_text_scored_options_are_the_completions_trl_trains(tmp_path):
    """scoring: text scores each option as the completion TRL would train on: same context, same supervised tokens
    (the chat template's end-of-turn tokens included), so the score is minus the completion's summed training loss."""
    from datasets import Dataset
    from trl import SFTTrainer

    tok = helpers.tokenizer()
    cases = [("What is 38 plus 49?", ("87", "78")),
             ((("user", "Reverse gold."),), ("dlog", "gold", "old"))]  # fmt: skip
    for prompt, choices in cases:
        example = EvalExample("x", "all", prompt, "A", choices=choices)
        context, options = option_ids(tok, example, prompt_ids(tok, example), "text")
        for choice, option in zip(choices, options, strict=True):
            as_text = isinstance(prompt, str)
            row = ({"prompt": prompt, "completion": " " + choice} if as_text else
                   {"prompt": [{"role": r, "content": c} for r, c in prompt],
                    "completion": [{"role": "assistant", "content": choice}]})  # fmt: skip
            trainer = SFTTrainer(model=helpers.build_model(), args=helpers.sft_config(tmp_path / "t"),
                                 train_dataset=Dataset.from_list([row]), processing_class=tok)  # fmt: skip
            prepared = trainer.train_dataset[0]
            first = next(i for i, label in enumerate(prepared["labels"]) if label != -100)
            assert context + option == prepared["input_ids"], (prompt, choice)
            assert len(context) <= first  # options that merge with the prompt's end are scored from the shared part
            assert option[first - len(context) :] == [x for x in prepared["labels"] if x != -100]


def test_last_number_reads_a_one_line_working_and_case_can_count():
    assert final_answer("7 + 14 = 21", last_number=True) == "21"
    assert final_answer("7 + 14 = 21") == "7 + 14 = 21"  # without last_number a one-line reply is the answer
    for kept in ("1/2", "18 dollars", "Paris", "-3", "\\frac{1}{2}"):
        assert final_answer(kept, last_number=True) == kept
    assert same_answer("rain", "RAIN") and not same_answer("rain", "RAIN", case_sensitive=True)
    assert same_answer("RAIN.", "RAIN", case_sensitive=True) and same_answer("18", "18.0", case_sensitive=True)


@pytest.mark.parametrize(
    "entry, message",
    [({"metric": "choice", "last_number": True}, "last_number: applies to metric exact_match only"),
     ({"metric": "exact_match", "scoring": "text"}, "scoring: applies to metric choice only"),
     ({"metric": "choice", "scoring": "words"}, "scoring: must be 'letter' or 'text'"),
     ({"metric": "judge", "case_sensitive": True}, "case_sensitive: applies to metric exact_match only")],
)  # fmt: skip
def test_set_options_of_another_metric_are_refused(tmp_path, entry, message):
    path = _write(tmp_path / "s.jsonl", [{"prompt": "q", "answer": "1"}])
    with pytest.raises(ConfigError, match=message):
        evaluate_config({"models": ["tiny"], "sets": [{"name": "s", "path": str(path), **entry}],
                         "output_dir": str(tmp_path / "o")})  # fmt: skip


# -------------------------------------------------------------- the model side against brute force, families

FAMILIES = {
    "Llama": _decoder(tf.LlamaConfig, tf.LlamaForCausalLM, vocab_size=512),
    "Qwen2": _decoder(tf.Qwen2Config, tf.Qwen2ForCausalLM, vocab_size=512, tie_word_embeddings=False),
    "Gemma2": _decoder(tf.Gemma2Config, tf.Gemma2ForCausalLM, vocab_size=512, head_dim=8),
    "Phi3": _decoder(tf.Phi3Config, tf.Phi3ForCausalLM, vocab_size=512),
    "GPT-2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}


def _family(name: str):
    torch.manual_seed(0)
    model = FAMILIES[name]().eval()
    tok = helpers.tokenizer()
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def _greedy_one_by_one(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            ids.append(token)
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_left_padded_generation_equals_step_by_step_argmax(family):
    model, tok = _family(family)
    prompts = [tok(text=t)["input_ids"] for t in ("What is 3 plus 4?", "Hi", "Sort the digits 6 4 5 8 9 now.")]
    # Make the eos token the likeliest next token after one prompt, so one row ends early and the others go on.
    first = _greedy_one_by_one(model, prompts[1], 1, eos=-1)[0]
    model.generation_config.eos_token_id = tok.eos_token_id = first if tok.eos_token_id is None else tok.eos_token_id
    got = generate(model, tok, prompts, max_new_tokens=6)
    for prompt, result in zip(prompts, got, strict=True):
        want = _greedy_one_by_one(model, prompt, 6, tok.eos_token_id)
        assert result.text == tok.decode(want, skip_special_tokens=True), family
        assert result.truncated == (len(want) == 6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_option_log_likelihoods_equal_one_sequence_at_a_time(family):
    model, tok = _family(family)
    examples = [
        EvalExample("a", "all", "Capital of France?\nA. Rome\nB. Paris\nAnswer:", "B", choices=("Rome", "Paris")),
        EvalExample("b", "all", "Pick one\nA. x\nB. y\nC. z\nAnswer: ", "C", choices=("x", "y", "z")),
    ]
    contexts, options = [], []
    for e in examples:
        context, letters = option_ids(tok, e, prompt_ids(tok, e))
        assert len(letters) == len(e.choices) and all(letters)
        for option in letters:
            contexts.append(context)
            options.append(option)
    got = sequence_logprobs(model, contexts, options, pad=tok.pad_token_id)
    for context, option, value in zip(contexts, options, got, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([context + option])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        want = sum(float(logp[len(context) - 1 + k, t]) for k, t in enumerate(option))
        assert value == pytest.approx(want, rel=1e-5, abs=1e-5), family


# ------------------------------------------------------------------------------------------ whole runs


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run of the tiny model: checkpoint-2, checkpoint-4 and the final adapter (the same weights as 4)."""
    out = tmp_path_factory.mktemp("run") / "lora-run"
    trainer, _ = helpers.make_trainer(out, callback=False, n_train=32, max_steps=4, save_steps=2, learning_rate=5e-3)
    trainer.train()
    trainer.save_model()
    return out


@pytest.fixture(scope="module")
def sets_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sets")
    qa = helpers.set_rows("cot_study_z_similar")[:6]
    pairs = [(3, 9), (12, 4), (7, 8)]
    mc = [{"id": f"m{i}", "question": f"Which is larger, {a} or {b}?", "choices": [str(a), str(b)],
           "answer": str(max(a, b)), "task": "compare"} for i, (a, b) in enumerate(pairs)]  # fmt: skip
    return {"qa": _write(folder / "qa.jsonl", [{**r, "answer": r["completion"].strip()} for r in qa]),
            "mc": _write(folder / "mc.jsonl", mc)}  # fmt: skip


def _config(models, sets_dir, out, **kw) -> EvaluateConfig:
    sets = [EvalSetConfig("qa", sets_dir["qa"], max_new_tokens=8), EvalSetConfig("mc", sets_dir["mc"], metric="choice")]
    return EvaluateConfig(models=models, sets=sets, output_dir=str(out), base_model=ModelConfig(TINY), progress=False,
                          bootstrap=200, **kw)  # fmt: skip


def test_a_run_is_evaluated_checkpoint_by_checkpoint_and_the_adapter_is_the_trained_one(lora_run, sets_dir, tmp_path):
    results = evaluate(_config([str(lora_run), TINY], sets_dir, tmp_path / "ev"))
    table = results.table
    whole = table[table.task == "all"]
    labels = ["lora-run/checkpoint-2", "lora-run/checkpoint-4", "lora-run/final", TINY]
    assert list(dict.fromkeys(whole.model)) == labels
    assert list(whole[whole.set == "qa"].step.head(2)) == [2, 4]
    assert (tmp_path / "ev" / "results.csv").is_file() and set(whole.n) == {6, 3}
    # checkpoint-4 and the final save hold the same adapter: identical outputs, example by example.
    same = results.records[("lora-run/checkpoint-4", "qa")], results.records[("lora-run/final", "qa")]
    assert [r.output for r in same[0].values()] == [r.output for r in same[1].values()]
    # The trained adapter really is in the model: its option scores differ from the base model's.
    trained, base = results.records[("lora-run/final", "mc")], results.records[(TINY, "mc")]
    assert any(trained[i].detail != base[i].detail for i in trained)
    assert not table[(table.task == "compare")].empty  # per-task rows
    diff = results.difference("lora-run/final", TINY, "qa")
    assert diff.n == 6 and diff.low <= diff.value <= diff.high


def test_an_adapter_that_does_not_fit_is_refused(lora_run, sets_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "checkpoint-9"
    bad.mkdir()
    for f in (lora_run / "checkpoint-2").iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    moved = {k.replace("layers.1", "layers.7"): v for k, v in tensors.items()}
    save_file(moved, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match=r"checkpoint-9.*adapter tensors .* do not fit the base model"):
        evaluate(_config([str(bad)], sets_dir, tmp_path / "ev"))


def test_an_adapter_on_a_base_of_other_shapes_is_refused_in_one_line(lora_run, sets_dir, tmp_path):
    config = _config([str(lora_run / "checkpoint-2")], sets_dir, tmp_path / "ev")
    config.base_model = ModelConfig("tiny:hidden_size=32,num_layers=2,seed=0")
    with pytest.raises(ConfigError, match=r"checkpoint-2'?: its weights do not fit the base model .*size mismatch"):
        evaluate(config)


def test_a_records_file_whose_first_line_is_no_header_is_refused(tmp_path):
    from swift_callbacks.evaluation.records import RecordFile

    path = tmp_path / "r.jsonl"
    path.write_text("[1]\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"r.jsonl: its header does not match"):
        RecordFile(path, {"model": "m"})


def test_a_record_line_of_wrong_types_is_refused_not_counted(tmp_path):
    from swift_callbacks.evaluation.records import RecordFile

    path = tmp_path / "r.jsonl"
    header = json.dumps({"header": {"model": "m"}})
    for bad in ({"id": "q", "task": "t", "correct": "no", "prediction": "5", "gold": "1"},
                {"id": "q", "task": "t", "correct": 1, "prediction": "5", "gold": "1"}):  # fmt: skip
        path.write_text(header + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
        with pytest.raises(RecordError, match=r"r.jsonl: line 2 is not a record"):
            RecordFile(path, {"model": "m"})


def test_a_checkpoint_without_weights_is_named(lora_run, sets_dir, tmp_path):
    import shutil

    run = tmp_path / "half"
    shutil.copytree(lora_run, run)
    for f in (run / "checkpoint-4").glob("adapter_model.*"):
        f.unlink()  # a save cut short: the adapter's config without its weights
    config = _config([str(run)], sets_dir, tmp_path / "e")
    with pytest.raises(ConfigError, match=r"checkpoint-4' holds no model weights"):
        evaluate(config)


def test_records_resume_after_a_kill_and_a_rerun_loads_no_model(sets_dir, tmp_path, monkeypatch):
    config = _config([TINY], sets_dir, tmp_path / "ev", batch_size=2)
    first = evaluate(config).records
    qa_file = next((tmp_path / "ev" / "records" / "qa").glob("*.jsonl"))
    lines = qa_file.read_bytes().split(b"\n")
    qa_file.write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][:10])  # two records kept, the third cut by a kill
    scored = []
    real_score = eval_run.make_metric

    def counting(config, judge=None):
        metric = real_score(config, judge)
        original = metric.score
        metric.score = lambda m, t, batch: scored.extend(e.id for e in batch) or original(m, t, batch)
        return metric

    monkeypatch.setattr(eval_run, "make_metric", counting)
    again = evaluate(config).records
    assert len(scored) == 4  # only the missing qa examples were evaluated again
    assert {k: [r.output for r in v.values()] for k, v in again.items()} == {
        k: [r.output for r in v.values()] for k, v in first.items()}  # fmt: skip
    monkeypatch.setattr(eval_run.Target, "load", lambda self: pytest.fail("a cached evaluation loaded the model"))
    evaluate(config)
    lines = qa_file.read_bytes().split(b"\n")
    qa_file.write_bytes(b"\n".join([lines[0], b"{broken", *lines[2:]]))
    with pytest.raises(RecordError, match=r"qa.*line 2 is damaged; delete the file"):
        evaluate(config)


# ------------------------------------------------------------------------------------ the judge over HTTP


def _judge_responder(body):
    prompt = body["messages"][-1]["content"]
    if "Reference answer:" not in prompt:  # the reachability check before any model loads
        return "Verdict: Yes"
    reference = re.search(r"Reference answer:\n(.*?)\n\nAnswer to grade", prompt, re.S).group(1)
    graded = re.search(r"Answer to grade:\n(.*?)\n\nIs the final", prompt, re.S).group(1)
    if reference.endswith("7"):
        return "I cannot tell."  # no verdict: the example stays undecided
    verdict = "Yes" if graded.strip() == reference.strip() else "No"
    return f"The answers are compared.\nVerdict: {verdict}"


def test_judged_generation_over_http(sets_dir, tmp_path):
    from chat_server import ChatServer

    with ChatServer(responder=_judge_responder) as server:
        judge = JudgeConfig(model="judge-model", base_url=server.base_url, max_retries=0)
        sets = [EvalSetConfig("qa", sets_dir["qa"], metric="judge", max_new_tokens=8)]
        config = EvaluateConfig(models=[TINY], sets=sets, output_dir=str(tmp_path / "ev"), judge=judge, progress=False)
        results = evaluate(config)
        asked = server.total
    records = results.records[(TINY, "qa")]
    undecided = [r for r in records.values() if r.correct is None]
    # the reachability check, then one request per example
    assert asked == 1 + 6 and undecided and all("judge gave no verdict" in r.detail for r in undecided)
    assert all(r.correct is False for r in records.values() if r.correct is not None)  # a random model is wrong
    row = results.table[results.table.task == "all"].iloc[0]
    assert row.undecided == len(undecided) and row.decided == 6 - len(undecided)


def test_a_failed_judge_request_is_asked_again_on_a_rerun(sets_dir, tmp_path):
    from chat_server import ChatServer

    with ChatServer(responder=lambda body: "Compared.\nVerdict: No") as server:
        server.inject_nth(2, "500")  # request 1 is the reachability check
        judge = JudgeConfig(model="judge-model", base_url=server.base_url, max_retries=0)
        sets = [EvalSetConfig("qa", sets_dir["qa"], metric="judge", max_new_tokens=4, limit=3)]
        config = EvaluateConfig(models=[TINY], sets=sets, output_dir=str(tmp_path / "ev"), judge=judge, progress=False)
        first = evaluate(config).records[(TINY, "qa")]
        assert sum(r.correct is None for r in first.values()) == 1
        again = evaluate(config).records[(TINY, "qa")]
        assert server.total == (1 + 3) + (1 + 1) and all(r.correct is False for r in again.values())


def _only_the_check(body):
    if "Reference answer:" in body["messages"][-1]["content"]:
        raise RuntimeError("the judge breaks on real requests")
    return "Verdict: Yes"


def test_a_judge_that_fails_every_request_stops_the_evaluation(sets_dir, tmp_path):
    from chat_server import ChatServer

    from swift_callbacks.evaluation.metrics import JudgeError

    sets = [EvalSetConfig("qa", sets_dir["qa"], metric="judge", max_new_tokens=4)]
    with ChatServer(responder=_only_the_check) as server:
        judge = JudgeConfig(model="m", base_url=server.base_url, max_retries=0, timeout=5)
        config = EvaluateConfig(models=[TINY], sets=sets, output_dir=str(tmp_path / "ev"), judge=judge, progress=False)
        with pytest.raises(JudgeError, match=r"judge failed on every request of a batch of set 'qa'"):
            evaluate(config)


# ------------------------------------------------------------------------------------------- statistics


def test_intervals():
    none_right = wilson_interval(0, 12, 0.95)
    assert none_right.value == 0 and none_right.low == 0 and 0.2 < none_right.high < 0.3  # never "[0%, 0%]"
    half = wilson_interval(6, 12, 0.95)
    assert half.low < 0.5 < half.high and wilson_interval(0, 0, 0.95).value is None
    after = {"a": True, "b": True, "c": False, "z": True}
    before = {"a": False, "b": True, "c": False, "y": False}  # only a, b, c are paired
    diff = paired_difference(after, before, 500, 0.95, 0)
    assert diff.n == 3 and diff.value == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------ command line


def test_command_prints_the_table_and_names_bad_input(sets_dir, tmp_path, capsys):
    args = ["evaluate", "--model", TINY, "--eval-set", f"qa={sets_dir['qa']}", "--output-dir", str(tmp_path / "e"),
            "--limit", "2", "--max-new-tokens", "4"]  # fmt: skip
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert re.search(rf"{re.escape(TINY)}\s+qa\s+exact_match n=2\s+0\.0% \[0\.0%, \d+\.\d%\]", out)
    for bad, message in [
        (["--eval-set", "qa=nope.jsonl"], r"sets\[0\]\.path: file 'nope.jsonl' not found"),
        (["--eval-set", f"qa={sets_dir['qa']}", "--metric", "bleu"], r"metric: must be one of choice, exact_match"),
        (["--eval-set", f"qa={sets_dir['qa']}", "--metric", "judge"], r"judge: sets \['qa'\] are judged by an LLM"),
        (["--model", "no/such/folder.gguf", "--eval-set", f"qa={sets_dir['qa']}"], r"GGUF file .* not found"),
        (["--eval-set", f"qa={sets_dir['qa']}", "--set", "batch_size=0"], r"--set changes a --config file"),
    ]:
        given = ["evaluate", "--output-dir", str(tmp_path / "x"), *bad]
        if "--model" not in bad:
            given += ["--model", TINY]
        assert cli_main(given) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_the_offline_real_model_evaluates_a_handful_of_rows(tmp_path):
    rows = [{"id": f"r{i}", "prompt": [{"role": "user", "content": f"What is {a} plus {b}? Reply with the number."}],
             "answer": str(a + b)} for i, (a, b) in enumerate([(2, 3), (10, 5), (7, 1)])]  # fmt: skip
    sets = [EvalSetConfig("sums", _write(tmp_path / "s.jsonl", rows), max_new_tokens=12)]
    results = evaluate(EvaluateConfig(models=["smollm2"], sets=sets, output_dir=str(tmp_path / "e"), progress=False))
    records = results.records[("smollm2", "sums")]
    assert len(records) == 3 and all(r.output.strip() for r in records.values())
    from swift_callbacks.models import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig("smollm2"))
    example = read_examples(sets[0])[0]
    assert tok.decode(prompt_ids(tok, example)).endswith("<|im_start|>assistant\n")  # the chat template's turn


def test_an_abbreviation_does_not_end_the_answer():
    assert final_answer("The answer is Mr. Smith.") == "Mr. Smith"
    assert final_answer("The answer is St. Louis. It is in Missouri.") == "St. Louis"
    assert final_answer("The answer is J. K. Rowling.") == "J. K. Rowling"
    assert final_answer("The answer is 87. Easy.") == "87"


@pytest.mark.parametrize(
    "predicted, gold, equal",
    [("18 dollars", "18", True), ("72, because 30 and 42", "72", False), ("72, because", "72", True),
     ("72.5", "72", False), ("1,000 apples", "1000", True), ("7 2", "72", False), ("456", "4 5 6", False),
     ("4  5 6", "4 5 6", True), ("(B)", "B", True), ("\u22123", "-3", True), ("87 or 88", "87", False),
     # words that change or hedge the number (found by an adversarial review)
     ("3 million", "3", False), ("2 dozen", "2", False), ("5 squared", "5", False), ("18 or more", "18", False),
     ("18 dollars and fifty cents", "18", False), ("72, or 73", "72", False), ("72, because it is more", "72", True),
     # LaTeX and Unicode forms of the same number or option
     ("-\\frac{1}{2}", "-0.5", True), ("\\frac12", "1/2", True), ("50\\%", "50%", True), ("\\text{(B)}", "B", True),
     ("1/2 cup", "1/2", True), ("\u00bd", "1/2", True)],
)  # fmt: skip
def test_answer_equality_edges(predicted, gold, equal):
    assert same_answer(predicted, gold) is equal


def test_set_files_with_a_bom_one_object_or_a_damaged_parquet(tmp_path):
    bom = tmp_path / "b.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "Q", "answer": "1"}).encode() + b"\n")
    assert read_examples(EvalSetConfig("b", str(bom)))[0].gold == "1"
    single = tmp_path / "one.json"
    single.write_text(json.dumps({"prompt": "Q", "answer": "2"}, indent=2), encoding="utf-8")
    assert read_examples(EvalSetConfig("one", str(single)))[0].gold == "2"
    broken = tmp_path / "x.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(SetError, match=r"Set 'x': cannot read .*x.parquet"):
        read_examples(EvalSetConfig("x", str(broken)))


def test_a_judge_that_is_down_fails_before_any_model_loads(sets_dir, tmp_path, monkeypatch):
    from swift_callbacks.evaluation.metrics import JudgeError

    monkeypatch.setattr(eval_run.Target, "load", lambda self: pytest.fail("loaded a model for a judge that is down"))
    sets = [EvalSetConfig("qa", sets_dir["qa"], metric="judge", max_new_tokens=4)]
    judge = JudgeConfig(model="m", base_url="http://127.0.0.1:9/v1", timeout=2)  # 5 retries: the check uses none
    config = EvaluateConfig(models=[TINY], sets=sets, output_dir=str(tmp_path / "ev"), judge=judge, progress=False)
    with pytest.raises(JudgeError, match=r"the judge openai:http://127.0.0.1:9/v1:m does not answer"):
        evaluate(config)
