"""Tests for the demo's bundled data and the tiny offline tokenizer/model builders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from swift_callbacks.assets import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import make_demo_data as make_data

COT_FILES = ("cot_study_z", "cot_study_z_similar", "cot_study_z_cot")
ALL_FILES = ("base", *COT_FILES)
KEYS = {"id", "task", "prompt", "completion", "answer"}


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {name: tiny.load_rows(name) for name in ALL_FILES}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer(tiny.demo_corpus())


# --------------------------------------------------------------------------------------------- data


def test_file_lists_agree() -> None:
    assert tuple(make_data.FILE_NAMES) == tiny.DATA_FILES == ALL_FILES


def test_committed_files_match_generator(rows) -> None:
    regenerated = make_data.build_all()
    assert set(regenerated) == set(ALL_FILES)
    for name in ALL_FILES:
        assert rows[name] == regenerated[name], name
        committed = (make_data.DATA_DIR / f"{name}.jsonl").read_text(encoding="utf-8")
        assert committed == make_data.to_jsonl(regenerated[name]), name


def test_write_all_is_byte_identical(tmp_path) -> None:
    written = make_data.write_all(tmp_path)
    for name, path in written.items():
        assert path.read_bytes() == (make_data.DATA_DIR / f"{name}.jsonl").read_bytes()


def test_load_rows_accepts_suffix_and_rejects_unknown() -> None:
    assert tiny.load_rows("cot_study_z.jsonl") == tiny.load_rows("cot_study_z")
    with pytest.raises(FileNotFoundError):
        tiny.load_rows("no_such_file")


def test_schema_ids_and_tasks(rows) -> None:
    assert len(make_data.TASKS) >= 10
    for name, file_rows in rows.items():
        assert file_rows, name
        ids = [r["id"] for r in file_rows]
        assert len(ids) == len(set(ids)), f"duplicate ids in {name}"
        for r in file_rows:
            assert set(r) == KEYS, r
            assert all(isinstance(v, str) for v in r.values()), r
            assert r["task"] in make_data.TASKS
        assert len({r["task"] for r in file_rows}) >= 10, name


def test_base_size_and_balance(rows) -> None:
    base = rows["base"]
    assert 400 <= len(base) <= 600
    counts = {t: sum(r["task"] == t for r in base) for t in make_data.TASKS}
    assert set(counts.values()) == {make_data.N_BASE_PER_TASK}
    assert len({r["prompt"] for r in base}) == len(base)


def test_cot_study_one_row_per_task_in_same_order(rows) -> None:
    orders = [[r["task"] for r in rows[name]] for name in COT_FILES]
    for order in orders:
        assert sorted(order) == sorted(make_data.TASKS)
        assert len(order) == len(set(order))
    assert orders[0] == orders[1] == orders[2] == make_data.TASKS


def test_z_and_z_similar_not_in_base(rows) -> None:
    base_prompts = {r["prompt"] for r in rows["base"]}
    for name in ("cot_study_z", "cot_study_z_similar", "cot_study_z_cot"):
        for r in rows[name]:
            assert r["prompt"] not in base_prompts, (name, r)
    for z, zs in zip(rows["cot_study_z"], rows["cot_study_z_similar"], strict=True):
        assert z["task"] == zs["task"]
        assert z["prompt"] != zs["prompt"]


def test_cot_rows_extend_z(rows) -> None:
    for z, zc in zip(rows["cot_study_z"], rows["cot_study_z_cot"], strict=True):
        assert zc["task"] == z["task"]
        assert zc["prompt"] == z["prompt"] + make_data.COT_SUFFIX
        assert zc["answer"] == z["answer"]
        assert zc["completion"].endswith(f" So the answer is {z['answer']}.")
        assert len(zc["completion"]) > len(z["completion"])


def test_prompt_completion_boundary_and_lengths(rows) -> None:
    for name, file_rows in rows.items():
        for r in file_rows:
            assert r["prompt"] == r["prompt"].rstrip() and r["prompt"], r
            assert r["completion"].startswith(" ") and not r["completion"].startswith("  "), r
            assert r["answer"] and r["answer"] == r["answer"].strip()
            if name != "cot_study_z_cot":
                assert len(r["prompt"]) < 80, r
                assert len(r["completion"]) < 20, r
                assert r["completion"] == " " + r["answer"], r


def test_answers_are_correct(rows) -> None:
    """Spot-checks the answers of the arithmetic and word tasks against the prompts."""
    for r in rows["base"] + rows["cot_study_z"] + rows["cot_study_z_similar"]:
        words = r["prompt"].rstrip("?.").split()
        if r["task"] == "add":
            assert int(r["answer"]) == int(words[2]) + int(words[4])
        elif r["task"] == "subtract":
            assert int(r["answer"]) == int(words[2]) - int(words[4])
        elif r["task"] == "reverse":
            assert r["answer"] == words[-1][::-1]
        elif r["task"] == "uppercase":
            assert r["answer"] == words[1].upper()
        elif r["task"] == "parity":
            assert r["answer"] == ("even" if int(words[1]) % 2 == 0 else "odd")


def test_data_is_small() -> None:
    total = sum((make_data.DATA_DIR / f"{n}.jsonl").stat().st_size for n in ALL_FILES)
    assert total < 300_000


def test_number_to_words() -> None:
    assert make_data.number_to_words(0) == "zero"
    assert make_data.number_to_words(13) == "thirteen"
    assert make_data.number_to_words(40) == "forty"
    assert make_data.number_to_words(47) == "forty-seven"
    with pytest.raises(ValueError):
        make_data.number_to_words(100)


# ---------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens(tokenizer) -> None:
    assert len(tokenizer) == 512
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for t in tiny.SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id
        assert len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1
    # No fragments of the special-token markers were learned as merges.
    assert not any("<|" in tok for tok in tokenizer.get_vocab() if tok not in tiny.SPECIAL_TOKENS)


def test_tokenizer_round_trip_and_boundary(tokenizer, rows) -> None:
    texts = ["What is 38 plus 49? 87", "Reverse the letters of needle. eldeen", "héllo wörld ✓ {}\n\tx"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    for r in rows["base"][:50] + rows["cot_study_z_cot"]:
        p = tokenizer(r["prompt"])["input_ids"]
        c = tokenizer(r["completion"])["input_ids"]
        assert tokenizer(r["prompt"] + r["completion"])["input_ids"] == p + c


def test_tokenizer_is_deterministic(tokenizer) -> None:
    again = tiny.build_tokenizer(tiny.demo_corpus())
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_chat_template_generation_mask(tokenizer) -> None:
    assert "{% generation %}" in tokenizer.chat_template or "{%- generation %}" in tokenizer.chat_template
    messages = [
        {"role": "user", "content": "What is 3 plus 4?"},
        {"role": "assistant", "content": "7"},
    ]
    kwargs = {"return_assistant_tokens_mask": True, "return_dict": True, "tokenize": True}
    out = tokenizer.apply_chat_template(messages, **kwargs)
    mask = out["assistant_masks"]
    assert len(mask) == len(out["input_ids"])
    masked = [i for i, m in zip(out["input_ids"], mask, strict=True) if m]
    assert masked, "assistant mask has no 1s"
    assert tokenizer.decode(masked) == "7<|im_end|>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n"
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full.startswith(prompt)
    assert full == tiny.render_chat("What is 3 plus 4?", " 7")


def test_chat_template_is_trl_compatible(tokenizer) -> None:
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)


# -------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_build_model_forward_and_rng(tokenizer, arch) -> None:
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    model = tiny.build_model(tokenizer, arch=arch, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state), "build_model changed the global RNG state"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config._attn_implementation == "eager"
    assert model.generation_config.eos_token_id == [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ]
    assert all(p.dtype == torch.float32 for p in model.parameters())

    batch = tokenizer(["What is 3 plus 4? 7", "Is 12 even or odd?"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    assert torch.isfinite(logits).all()


def test_build_model_is_seeded(tokenizer) -> None:
    a = tiny.build_model(tokenizer, seed=0)
    b = tiny.build_model(tokenizer, seed=0)
    c = tiny.build_model(tokenizer, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_build_model_rejects_unknown_arch(tokenizer) -> None:
    with pytest.raises(ValueError):
        tiny.build_model(tokenizer, arch="gpt9")


def test_save_reload_round_trip(tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok, model = tiny.build_demo_assets(tmp_path / "tiny")
    tok2 = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tiny")
    tok3 = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    # attn_implementation is not stored in config.json: a plain reload picks SDPA, so ask for eager again.
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", attn_implementation="eager")
    model_sdpa = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")

    text = "What is the capital of Turkey? Ankara"
    for t in (tok2, tok3):
        assert t(text)["input_ids"] == tok(text)["input_ids"]
        assert t.pad_token_id == tok.pad_token_id and t.eos_token_id == tok.eos_token_id
        assert t.chat_template == tok.chat_template
    assert type(model2) is type(model)
    assert model2.config.vocab_size == len(tok)
    batch = tok([text], return_tensors="pt")
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert model2.dtype == torch.float32
    with torch.no_grad():
        ref = model(**batch).logits
        assert torch.equal(ref, model2(**batch).logits)
        assert torch.allclose(ref, model_sdpa(**batch).logits, atol=1e-5)
    json.loads((tmp_path / "tiny" / "config.json").read_text())
