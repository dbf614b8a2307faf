"""Every bad input gets a clear error naming the set, the example and the reason."""

from __future__ import annotations

import functools
import json

import pytest
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from swift_callbacks import InfluenceCallback, SetError, cot_study, load_failures, load_pairs, load_scores, load_set
from swift_callbacks.assets.tiny import build_model, build_tokenizer, demo_corpus, load_rows

GOOD = [
    {"id": "a", "prompt": "What is 1 plus 1?", "completion": " 2"},
    {"id": "b", "prompt": "Hi?", "completion": " yo"},
]


@functools.cache
def tokenizer():
    return build_tokenizer(demo_corpus())


def trainer(tmp_path, **overrides):
    tok = tokenizer()
    config = dict(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, use_cpu=True, bf16=False,
        report_to=[], gradient_checkpointing=False, max_length=64,
    )  # fmt: skip
    config.update(overrides)
    train = Dataset.from_list([{k: r[k] for k in ("prompt", "completion")} for r in load_rows("base")[:16]])
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"])
    return SFTTrainer(model=build_model(tok), args=SFTConfig(**config), train_dataset=train, processing_class=tok,
                      peft_config=lora)  # fmt: skip


# ------------------------------------------------------------------------------------ load_set only


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([], "'s' is empty"),
        ([{"id": "x", "question": "q", "answer": "a"}], r"example 'x': unknown format"),
        ([{"id": "x", "prompt": "p", "completion": " c"}, {"id": "x", "prompt": "q", "completion": " d"}],
         r"duplicate example ids \['x'\]"),
        ([{"id": "x", "prompt": "p", "completion": "  "}], r"example 'x': field 'completion' is empty"),
        ([{"id": "x", "prompt": "p", "completion": 3}], r"example 'x': 'prompt' and 'completion' must both be"),
        ([{"id": "x", "messages": [{"role": "user"}]}], r"example 'x': message 0 of field 'messages'"),
        ([{"id": "x", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}],
         r"example 'x': message 1 of field 'messages': 'content' must be text, got None"),
        ([{"id": "x", "prompt": [{"role": "user", "content": 123}], "completion": [{"role": "assistant",
          "content": "a"}]}], r"example 'x': message 0 of field 'prompt': 'content' must be text, got 123"),
        ([{"id": "x", "prompt": "p", "completion": " c", "task": 5}], r"example 'x': field 'task' must be a string"),
        ([{"id": "x", "prompt": "p", "completion": " c", "task": "t"}, {"id": "y", "prompt": "p", "completion": " c"}],
         r"'task' is missing on examples \['y'\]"),
        ([{"prompt": "p", "completion": " c"}, {"messages": [{"role": "user", "content": "hi"}]}], "mixes"),
        ([{"id": "x", "prompt": "p", "completion": " c"}, {"prompt": "p", "completion": " c"}], "'id' is missing"),
    ],
)  # fmt: skip
def test_load_set_errors(rows, match):
    with pytest.raises(SetError, match=match):
        load_set("s", rows)


def test_files(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in GOOD) + "\n", encoding="utf-8")
    assert load_set("s", good).ids == ["a", "b"]
    Dataset.from_list(GOOD).to_parquet(tmp_path / "good.parquet")
    assert load_set("s", str(tmp_path / "good.parquet")).ids == ["a", "b"]
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "p", "completion": " c"}\n{oops\n', encoding="utf-8")
    with pytest.raises(SetError, match=r"bad\.jsonl line 2 is not valid JSON"):
        load_set("s", bad_json)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9", "completion": " c"}\n')
    with pytest.raises(SetError, match="not valid UTF-8"):
        load_set("s", latin)
    with pytest.raises(SetError, match=r"unknown file type .\.csv."):
        load_set("s", tmp_path / "x.csv")
    with pytest.raises(SetError, match="does not exist"):
        load_set("s", tmp_path / "missing.jsonl")


def test_formats_are_detected():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert load_set("s", [{"messages": msgs}]).format == "messages"
    assert load_set("s", [{"prompt": msgs[:1], "completion": msgs[1:]}]).format == "prompt_completion"
    assert load_set("s", [{"text": "hello"}]).format == "text"
    assert load_set("s", [{"input_ids": [1, 2, 3]}]).format == "tokenized"
    assert load_set("s", Dataset.from_list(GOOD)).ids == ["a", "b"]


# ---------------------------------------------------------------------------------- with a trainer


def test_truncated_completion_is_detected_not_dropped(tmp_path):
    long_prompt = "What is " + " plus ".join(str(i) for i in range(60)) + "?"
    rows = [*GOOD, {"id": "too-long", "prompt": long_prompt, "completion": " 7"}]
    with pytest.raises(SetError, match=r"Set 'p': examples \['too-long'\] have no completion tokens left"):
        InfluenceCallback(
            trainer(tmp_path, max_length=32), probe_sets={"p": rows}, eval_sets={"e": [*GOOD, GOOD[0] | {"id": "c"}]}
        )  # equal sizes: position pairing is checked first, at construction


def test_set_name_used_twice(tmp_path):
    with pytest.raises(SetError, match="'x' is used twice"):
        InfluenceCallback(trainer(tmp_path), probe_sets={"x": GOOD}, eval_sets={"x": GOOD})


def test_study_set_registered_twice_with_other_data(tmp_path):
    study = cot_study(z=GOOD, z_similar=GOOD, z_cot=GOOD)
    with pytest.raises(ValueError, match="'cot' is registered twice"):
        InfluenceCallback(trainer(tmp_path), probe_sets={"cot": list(GOOD)}, studies=[study])


def test_position_pairing_needs_equal_sizes(tmp_path):
    with pytest.raises(SetError, match="Probe set 'p' / evaluation set 'e': Pairing by position needs sets of equal"):
        InfluenceCallback(trainer(tmp_path), probe_sets={"p": GOOD}, eval_sets={"e": GOOD[:1]})


def test_empty_and_missing_sets(tmp_path):
    with pytest.raises(SetError, match="'p' is empty"):
        InfluenceCallback(trainer(tmp_path), probe_sets={"p": []}, eval_sets={"e": GOOD})
    with pytest.raises(SetError, match="at least one probe set and one evaluation set"):
        InfluenceCallback(trainer(tmp_path), probe_sets={"p": GOOD})


@pytest.mark.parametrize("layout", [{"packing": True}, {"padding_free": True, "max_length": None}])
def test_packing_with_masked_sets(tmp_path, layout):
    tr = trainer(tmp_path, **layout)
    with pytest.raises(SetError, match="packing/padding-free"):
        InfluenceCallback(tr, probe_sets={"p": GOOD}, eval_sets={"e": GOOD})
    cb = InfluenceCallback(tr, probe_sets={"p": GOOD}, eval_sets={"e": GOOD}, allow_packing=True)
    assert len(cb.probe_sets[0].examples) == 2


def test_zero_eval_gradient_norm_with_strict_raises(tmp_path):
    # LoRA B starts at zero, so at step 0 the gradient of every lora_A is exactly zero.
    tr = trainer(tmp_path)
    cb = InfluenceCallback(
        tr, probe_sets={"p": GOOD}, eval_sets={"e": GOOD}, param_filter="lora_A", at_step_zero=True, strict=True
    )
    tr.add_callback(cb)
    with pytest.raises(SetError, match=r"Set 'e': evaluation examples \['a', 'b'\] have a zero"):
        tr.train()


def test_zero_eval_gradient_norm_is_recorded_and_training_goes_on(tmp_path):
    """The same real zero gradient without ``strict``: step 0 is stored with NaN RelInf, recorded, not scored."""
    tr = trainer(tmp_path, save_steps=2)
    cb = InfluenceCallback(tr, probe_sets={"p": GOOD}, eval_sets={"e": GOOD}, param_filter="lora_A", at_step_zero=True)
    tr.add_callback(cb)
    tr.train()
    assert tr.state.global_step == 2
    (failure,) = load_failures(tmp_path).to_dict("records")
    assert (failure["step"], failure["kind"], failure["set"], failure["ids"]) == (0, "eval_norm", "e", ["a", "b"])
    pairs = load_pairs(tmp_path)
    assert pairs[pairs.step == 0].relinf.isna().all() and pairs[pairs.step == 2].relinf.notna().all()
    scores = load_scores(tmp_path).set_index("step")
    assert (scores.loc[0, "n_in"], scores.loc[0, "n_cross"]) == (0, 0) and scores.loc[2, "n_in"] == 2
