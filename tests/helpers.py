"""Shared builders for the end-to-end training tests (tiny offline model, LoRA SFTTrainer, demo sets).

Every run here is short (at most a few dozen optimizer steps of batch 8 on a 2-layer, 64-wide model), so a
training run takes about a second on CPU. Importing this module forces the Hugging Face libraries offline.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from transformers import TrainerCallback

from swift_callbacks import InfluenceCallback, InfluenceEngine
from swift_callbacks.assets import tiny

LORA_TARGETS = ["up_proj", "down_proj"]
MODEL_KWARGS = {"hidden_size": 64, "num_layers": 2, "seed": 0}

# Defaults of every training run; a test overrides single fields through ``make_trainer(**overrides)``.
BASE_CONFIG: dict[str, Any] = {
    "max_steps": 20,
    "save_steps": 10,
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-3,
    "use_cpu": True,
    "bf16": False,
    "report_to": [],
    "logging_steps": 5,
    "activation_checkpointing": False,  # SFTConfig turns it on by default (alias: gradient_checkpointing)
    "max_length": 128,
    "seed": 0,
    "data_seed": 0,
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
}


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run with ``n`` intra-op threads (restored after).

    The models here are so small that one thread is as fast as several, while on a busy 2-core machine
    OpenMP threads that spin-wait for a preempted sibling make a 1-second run take 15-30 seconds.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def tokenizer():
    """The demo tokenizer (trained once per process; it is deterministic)."""
    return tiny.build_tokenizer(tiny.demo_corpus())


def build_model(seed: int = 0):
    """A fresh tiny Llama in float32 (identical for the same seed)."""
    return tiny.build_model(tokenizer(), **{**MODEL_KWARGS, "seed": seed})


def lora_config(dropout: float = 0.1):
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules=list(LORA_TARGETS), lora_dropout=dropout)


def train_rows(n: int | None = None) -> list[dict]:
    """``prompt``/``completion`` rows of the demo's base training file (the first ``n`` if given)."""
    rows = tiny.load_rows("base")
    if n is not None:
        rows = rows[:n]
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]


def train_dataset(n: int | None = None):
    from datasets import Dataset

    return Dataset.from_list(train_rows(n))


def set_rows(name: str, n: int | None = None) -> list[dict]:
    """Rows of a demo study file with ``id``, ``task``, ``prompt`` and ``completion`` (the first ``n`` if given)."""
    rows = tiny.load_rows(name)
    if n is not None:
        rows = rows[:n]
    return [{k: r[k] for k in ("id", "task", "prompt", "completion")} for r in rows]


def probe_sets(n: int | None = None) -> dict[str, list[dict]]:
    """CoT and non-CoT probes of the demo study: ``{"z_cot": Z'', "z": Z}``."""
    return {"z_cot": set_rows("cot_study_z_cot", n), "z": set_rows("cot_study_z", n)}


def eval_sets(n: int | None = None) -> dict[str, list[dict]]:
    """The demo study's evaluation set ``{"z_similar": Z'}``."""
    return {"z_similar": set_rows("cot_study_z_similar", n)}


def sft_config(out: str | os.PathLike, **overrides):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(out), **{**BASE_CONFIG, **overrides})


def make_trainer(
    out: str | os.PathLike,
    callback: bool = True,
    *,
    callback_kwargs: Mapping[str, Any] | None = None,
    extra_callbacks: Sequence[TrainerCallback] = (),
    callbacks: Sequence[TrainerCallback] | None = None,
    n_train: int | None = 160,
    lora_dropout: float = 0.1,
    model_seed: int = 0,
    **overrides,
):
    """A LoRA SFTTrainer on the tiny model, with an ``InfluenceCallback`` attached when ``callback``.

    Args:
        out: ``output_dir``.
        callback: Attach an ``InfluenceCallback``.
        callback_kwargs: Keyword arguments of the callback (default: the demo probe and evaluation sets).
        extra_callbacks: Further callbacks, added after the influence callback.
        callbacks: Callbacks given to the trainer's constructor (``SFTTrainer(callbacks=...)``).
        n_train: Size of the training set (the first rows of ``base``); ``None`` for all.
        lora_dropout: LoRA dropout.
        model_seed: Seed of the base model.
        **overrides: ``SFTConfig`` fields replacing ``BASE_CONFIG``.

    Returns:
        ``(trainer, callback)``; ``callback`` is None without one.
    """
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=build_model(model_seed),
        args=sft_config(out, **overrides),
        train_dataset=train_dataset(n_train),
        processing_class=tokenizer(),
        peft_config=lora_config(lora_dropout),
        callbacks=callbacks,
    )
    cb = None
    if callback:
        kwargs = {"probe_sets": probe_sets(), "eval_sets": eval_sets(), **(callback_kwargs or {})}
        cb = InfluenceCallback(trainer, **kwargs)
        trainer.add_callback(cb)
    for extra in extra_callbacks:
        trainer.add_callback(extra)
    return trainer, cb


def trainable_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every trainable parameter, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_params_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Bit-identical parameter sets (same names, ``torch.equal`` everywhere)."""
    assert a.keys() == b.keys()
    assert a, "no trainable parameters"
    diff = [n for n in a if not torch.equal(a[n], b[n])]
    assert not diff, f"parameters differ: {diff[:5]} (max |d| {max((a[n] - b[n]).abs().max().item() for n in diff)})"


def losses(log_history: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """``(step, loss)`` of every training-loss record."""
    return [(r["step"], r["loss"]) for r in log_history if "loss" in r]


class StopAt(TrainerCallback):
    """Ends training after optimizer step ``step`` (its checkpoint, if one is due, is still written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def reload_checkpoint(checkpoint: str | os.PathLike, model_seed: int = 0):
    """The tiny base model with the LoRA adapter of ``checkpoint``, adapter weights trainable (tracked)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(build_model(model_seed), str(Path(checkpoint)), is_trainable=True)


def engine_on(model: torch.nn.Module, **kwargs) -> InfluenceEngine:
    tok = tokenizer()
    return InfluenceEngine(model, pad_token_id=tok.pad_token_id, **kwargs)


def examples_of(cb: InfluenceCallback) -> tuple[list[dict], list[dict]]:
    """The callback's tokenized probe and evaluation examples, in the order it scores them."""
    probes = [ex for s in cb.probe_sets for ex in s.examples]
    evals = [ex for s in cb.eval_sets for ex in s.examples]
    return probes, evals


def assert_close_rel(actual, expected, rtol: float, what: str = "") -> None:
    """``|a - e| <= rtol * max(|e|, scale)`` elementwise, with ``scale`` a small fraction of ``max |e|``.

    Inner products of nearly orthogonal gradients can be tiny; their error is bounded by the size of the
    vectors, not the product, so the tolerance floor scales with the largest magnitude.
    """
    a = torch.tensor(np.asarray(actual), dtype=torch.float64)
    e = torch.tensor(np.asarray(expected), dtype=torch.float64)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    floor = 1e-3 * float(e.abs().max()) if e.numel() else 0.0
    bound = rtol * torch.clamp(e.abs(), min=floor)
    err = (a - e).abs()
    bad = err > bound
    assert not bad.any(), f"{what}: {int(bad.sum())} entries differ; worst rel err {float((err / e.abs()).max()):.3g}"


def plain_examples(rows: Sequence[Mapping[str, str]]) -> list[dict]:
    """``{"input_ids", "labels"}`` of prompt + completion + EOS, prompt tokens masked (no Trainer involved)."""
    tok = tokenizer()
    out = []
    for r in rows:
        prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        completion = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return out


# Engine settings exercised by the multi-process engine test: every route, several micro-batches, and (with a
# one-byte feature budget) evaluation chunks smaller than the world size.
ENGINE_CONFIGS: dict[str, dict[str, Any]] = {
    "auto": {"micro_batch_size": 3},
    "ghost_chunked": {"route": "ghost", "micro_batch_size": 2, "max_feature_bytes": 1},
    "materialize": {"route": "materialize", "micro_batch_size": 4},
    "auto_budget": {"max_feature_bytes": "auto", "micro_batch_size": 3},  # ranks agree on the free memory's chunks
    "held_probes": {"micro_batch_size": 2, "max_feature_bytes": 1},  # 3 probes (below): held, evaluations streamed
}
ENGINE_N_PROBE, ENGINE_N_EVAL = 7, 5
# Probes per configuration where not all 7: with a one-byte budget, 3 probes against 5 evaluation examples are held
# (3 + 3 x 5 passes, not 5 + 5 x 3).
_ENGINE_PROBES = {"held_probes": 3}


def engine_case(name: str) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """The engine options, probes and evaluation examples of ``ENGINE_CONFIGS[name]``."""
    probes, evals = engine_examples()
    return ENGINE_CONFIGS[name], probes[: _ENGINE_PROBES.get(name, len(probes))], evals


def engine_examples() -> tuple[list[dict], list[dict]]:
    """7 CoT probes and 5 evaluation examples, tokenized without a Trainer."""
    probes = plain_examples(set_rows("cot_study_z_cot", ENGINE_N_PROBE))
    evals = plain_examples(set_rows("cot_study_z_similar", ENGINE_N_EVAL))
    return probes, evals


def result_dict(result) -> dict[str, torch.Tensor]:
    """The fields of an ``InfluenceResult`` as a plain dict (for ``torch.save``)."""
    return {k: getattr(result, k) for k in result.__dataclass_fields__}


# The multi-process training run: probe and evaluation set sizes not divisible by the world size (2), so the
# engine pads the ranks' shares.
DDP_CONFIG: dict[str, Any] = {
    "max_steps": 10,
    "save_steps": 5,
    "ddp_backend": "gloo",
    "ddp_find_unused_parameters": False,
}
DDP_SAVED_STEPS = [5, 10]


def ddp_callback_kwargs() -> dict[str, Any]:
    return {
        "probe_sets": {"z_cot": set_rows("cot_study_z_cot", 5)},
        "eval_sets": {"z_similar": set_rows("cot_study_z_similar", 3)},
        "micro_batch_size": 2,
    }
