"""Full fine-tuning and bf16 weights through the callback; the paper's three studies registered together."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_close_rel,
    build_model,
    engine_on,
    eval_sets,
    examples_of,
    probe_sets,
    set_rows,
    sft_config,
    tokenizer,
    torch_threads,
    train_dataset,
)
from transformers import AutoModelForCausalLM
from trl import SFTTrainer

from swift_callbacks import InfluenceCallback, clarify_study, evaluation_study, load_metrics, load_pairs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-weights"])
def test_full_finetuning_matches_engine_on_checkpoint(tmp_path, dtype):
    model = build_model().to(dtype)
    args = sft_config(tmp_path, max_steps=6, save_steps=3, learning_rate=1e-4)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset(32), processing_class=tokenizer())
    cb = InfluenceCallback(trainer, probe_sets=probe_sets(4), eval_sets=eval_sets(4), micro_batch_size=3)
    trainer.add_callback(cb)
    trainer.train()
    assert cb.engine.num_tracked_params == sum(p.numel() for p in model.parameters())  # every weight, full FT
    pairs = load_pairs(tmp_path)
    assert sorted(pairs.step.unique()) == [3, 6]
    probes, evals = examples_of(cb)
    # Load in fp32 and cast like the trained model was, so buffers (rotary inv_freq) have the same dtype too.
    ckpt = tmp_path / "checkpoint-3"
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").to(dtype)
    result = engine_on(reloaded, micro_batch_size=3).compute(probes, evals)
    at3 = pairs[pairs.step == 3]
    assert_close_rel(at3["dot"].to_numpy(), result.dot.reshape(-1).numpy(), 1e-5, "dot at step 3")
    assert torch.isfinite(torch.tensor(pairs["relinf"].to_numpy())).all()


def test_clarify_and_evaluation_studies_share_sets(tmp_path):
    rows = {name: set_rows("cot_study_z_similar", 4) for name in ("pos", "pos_similar", "neg_similar")}
    clarify = set_rows("cot_study_z", 4)
    e_pos, e_neg = set_rows("cot_study_z_cot", 4), set_rows("cot_study_z", 4)
    studies = [
        clarify_study(clarify, rows["pos"], rows["pos_similar"], rows["neg_similar"]),
        evaluation_study(e_pos, e_neg, rows["pos"], rows["pos_similar"], rows["neg_similar"]),
    ]
    args = sft_config(tmp_path, max_steps=2, save_steps=2)
    trainer = SFTTrainer(model=build_model(), args=args, train_dataset=train_dataset(16), processing_class=tokenizer())
    trainer.add_callback(InfluenceCallback(trainer, studies=studies))
    trainer.train()
    labels = set(load_metrics(tmp_path).metric)
    expected = {f"{p} → {c} {e}" for p in ("Clarify", "Pos") for c in ("In-task", "Cross-task") for e in ("Pos", "Neg")}
    expected |= {
        f"{p} → {c} {e}" for p in ("EvalPos", "EvalNeg") for c in ("In-task", "Cross-task") for e in ("Pos", "Neg")
    }
    assert labels == expected
    pairs = load_pairs(tmp_path)
    assert set(pairs.probe_set) == {"clarify", "pos", "eval_pos", "eval_neg"}
    assert set(pairs.eval_set) == {"pos_similar", "neg_similar"}
