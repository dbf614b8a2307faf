"""Probe and eval sets are tokenized exactly as the trainer tokenizes its training data."""

from __future__ import annotations

import pytest
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from swift_callbacks import InfluenceCallback
from swift_callbacks.assets.tiny import build_model, build_tokenizer, demo_corpus, load_rows

ROWS = load_rows("base")[:6]


def _messages(row):
    return {
        "messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    }


@pytest.mark.parametrize(
    ("to_row", "extra"),
    [
        (lambda r: {"prompt": r["prompt"], "completion": r["completion"]}, {}),
        (_messages, {"assistant_only_loss": True}),
        (lambda r: {"text": r["prompt"] + r["completion"]}, {}),
    ],
    ids=["prompt-completion", "messages-assistant-only", "text"],
)
def test_sets_match_training_tokenization(tmp_path, to_row, extra):
    tok = build_tokenizer(demo_corpus())
    rows = [to_row(r) for r in ROWS]
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_length=64,
                     gradient_checkpointing=False, **extra)  # fmt: skip
    trainer = SFTTrainer(model=build_model(tok), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    cb = InfluenceCallback(trainer, probe_sets={"p": rows}, eval_sets={"e": rows})
    trained = {tuple(r["input_ids"]): r["labels"] for r in trainer.train_dataset}
    for ex in cb.probe_sets[0].examples:
        assert trained[tuple(ex["input_ids"])] == ex["labels"]
    if extra or "prompt" in rows[0]:  # completion-only / assistant-only: the prompt is masked
        assert all(ex["labels"][0] == -100 for ex in cb.probe_sets[0].examples)


def test_plain_trainer_takes_pretokenized_sets(tmp_path):
    from transformers import Trainer, TrainingArguments

    from swift_callbacks import SetError

    tok = build_tokenizer(demo_corpus())
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = Trainer(model=build_model(tok), args=args)
    ids = tok("What is 1 plus 1? 2")["input_ids"]
    rows = [{"id": "x", "input_ids": ids, "labels": [-100] * 6 + ids[6:]}]
    cb = InfluenceCallback(trainer, probe_sets={"p": rows}, eval_sets={"e": rows})
    assert cb.probe_sets[0].examples == [{"input_ids": ids, "labels": rows[0]["labels"]}]
    with pytest.raises(SetError, match="give the set pre-tokenized"):
        InfluenceCallback(trainer, probe_sets={"p": ROWS}, eval_sets={"e": ROWS})
