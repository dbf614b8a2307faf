"""The ScaleQuest training stages (QFT with TRL SFT, QPO with TRL DPO) and local models on tiny real models:
EOS handling of the data as TRL tokenizes it, training and saving, prefix generation and sequence scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from swift_callbacks.builders.scalequest import (
    GenerateSettings,
    ModelSpec,
    Sampling,
    SequenceScoreBackend,
    generate_questions,
    generation_backend,
    qft_data,
    train_qft,
    train_qpo,
)
from swift_callbacks.builders.scalequest.contract import load_stats
from swift_callbacks.builders.scalequest.models import load_causal_lm
from swift_callbacks.generation import GenerationRequest, Generator, SamplingParams

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "recipes" / "scalequest" / "data" / "seed_problems.jsonl"
TINY = "tiny:hidden_size=64,num_layers=2,seed=0"
FAST = {"use_cpu": True, "activation_checkpointing": False, "save_strategy": "no", "report_to": "none",
        "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0, "logging_steps": 1}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    # Models this small run fastest on one thread; spinning OpenMP threads slow a busy 2-core machine down.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qft_rows(tmp_path_factory):
    tokenizer, _ = load_causal_lm(ModelSpec.parse(TINY))
    out = tmp_path_factory.mktemp("qft") / "qft-data.jsonl"
    qft_data(SEEDS, out, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="module")
def qft_model(qft_rows, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qft-model") / "qft"
    train_qft(qft_rows, folder, model=TINY, training={**FAST, "max_steps": 2, "learning_rate": 1e-3,
                                                      "per_device_train_batch_size": 4})  # fmt: skip
    return folder


def test_trl_sft_sees_exactly_one_eos_at_the_end_of_each_question(qft_rows):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer, model = load_causal_lm(ModelSpec.parse(TINY))
    rows = [json.loads(line) for line in qft_rows.read_text().splitlines()][:4]
    args = SFTConfig(output_dir="unused", packing=False, max_length=256, **{k: v for k, v in FAST.items()})
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    eos = tokenizer.eos_token_id
    for example, row in zip(trainer.train_dataset, rows, strict=True):
        ids, labels = example["input_ids"], example["labels"]
        assert ids[-1] == eos and ids.count(eos) == 1  # the EOS written in the data; TRL added none
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        assert labels == [-100] * len(prompt_ids) + ids[len(prompt_ids) :]  # loss on the question and its EOS only


def test_qft_trains_and_saves_a_loadable_question_generator(qft_model, qft_rows):
    stats = load_stats(qft_model)
    assert stats.complete and stats.rows_in == stats.rows_out == 40 and stats.metrics["global_step"] == 2
    assert stats.metrics["max_length"] == 256 and stats.settings["training"]["max_steps"] == 2
    assert (qft_model / "config.json").is_file() and (qft_model / "tokenizer.json").is_file()
    assert json.loads((qft_model.parent / "qft.rejects.jsonl").read_text() or "[]") == []

    backend = generation_backend(ModelSpec.parse(str(qft_model)))
    assert backend.model.startswith(f"{qft_model}@")  # the folder's version is part of the cache key
    prefix = "<|im_start|>user\n"
    req = GenerationRequest.completion("k", prefix, SamplingParams())
    assert backend._encode(req) == backend.tokenizer(prefix, add_special_tokens=False)["input_ids"]  # raw, no template
    settings = GenerateSettings(num_questions=6, samples_per_request=3, sampling=Sampling(1.0, 0.99, 12))
    result = generate_questions(qft_model.parent / "gen.jsonl", generator=Generator(backend, None, progress=False),
                                prefix=prefix, settings=settings)  # fmt: skip
    # 6 samples: finished questions are rows; the random tiny model rarely ends within 12 tokens, and a question
    # cut at the token limit is rejected as such.
    assert len(result.rows) + len(result.rejects) == 6 and all(isinstance(r["question"], str) for r in result.rows)
    assert all(r.reason == "truncated reply" for r in result.rejects)


def test_qpo_trains_on_pairs_and_trl_adds_no_second_eos(qft_model, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    eos, prompt = "<|endoftext|>", "<|im_start|>user\n"
    pairs = [{"id": f"p{i}", "prompt": prompt, "chosen": f"Ann has {i} pens and buys 2. How many?{eos}",
              "rejected": f"Ann has pens?{eos}"} for i in range(4)]  # fmt: skip
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in pairs))

    spec = ModelSpec.parse(str(qft_model))
    tokenizer, model = load_causal_lm(spec)
    args = DPOConfig(output_dir=str(tmp_path / "unused"), **FAST)
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    for example in trainer.train_dataset:
        for key in ("chosen_ids", "rejected_ids"):
            assert example[key][-1] == tokenizer.eos_token_id and example[key].count(tokenizer.eos_token_id) == 1
    del trainer, model

    result = train_qpo(source, tmp_path / "qpo", model=spec,
                       training={**FAST, "max_steps": 2, "per_device_train_batch_size": 2,
                                 "gradient_accumulation_steps": 1, "learning_rate": 1e-4})  # fmt: skip
    stats = result.stats
    assert stats.rows_out == 4 and stats.metrics["pairs"] == 4 and stats.metrics["global_step"] == 2
    assert (tmp_path / "qpo" / "config.json").is_file() and load_stats(tmp_path / "qpo").complete


def test_training_overrides_are_checked_before_training(qft_rows, tmp_path):
    from swift_callbacks.builders.scalequest import ConfigError

    with pytest.raises(ConfigError, match=r"qft\.training\.learnig_rate: unknown SFTConfig argument; did you mean"):
        train_qft(qft_rows, tmp_path / "m", model=TINY, training={"learnig_rate": 1e-3})
    assert not (tmp_path / "m").exists()


def test_sequence_scores_do_not_depend_on_batching():
    spec = ModelSpec.parse("tiny:hidden_size=32,num_layers=1,seed=3")
    texts = [("What is 2 + 2?", "It is \\boxed{4}."), ("A much longer question about many apples?", "\\boxed{7}")]
    requests = [GenerationRequest.chat(f"r{i}", [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                for i, (q, a) in enumerate(texts)]  # fmt: skip
    batched = SequenceScoreBackend(spec, text_format="chat")
    single = SequenceScoreBackend(ModelSpec.parse("tiny:hidden_size=32,num_layers=1,seed=3"), text_format="chat")
    single.batch_size = 1
    both = {r.key: float(r.texts[0]) for r in batched.generate(requests)}
    alone = {r.key: float(r.texts[0]) for r in single.generate(requests)}
    assert both == pytest.approx(alone, abs=1e-5)
    assert batched.model.endswith("#chat")
