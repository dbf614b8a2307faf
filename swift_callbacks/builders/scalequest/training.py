"""The three trainings of the pipeline: QFT (TRL SFT), QPO (TRL DPO) and the difficulty scorer (a transformers
sequence regression), each from a model spec, a list of rows and a dict of trainer-argument overrides.

Defaults are the paper's settings; ``overrides`` may set any field of ``trl.SFTConfig`` / ``trl.DPOConfig`` /
``transformers.TrainingArguments`` (checked: an unknown name is an error naming its key path). ``bf16`` defaults
to on when a CUDA device supports it and off otherwise, so one config runs on a GPU and on a CPU.

Checkpoints go to ``<output_dir>/checkpoints/<run key>/``, the run key being the stage's fingerprint (data, model
and settings): an interrupted training resumes from its latest checkpoint, and a training with other data or
settings never resumes from checkpoints that are not its own. The final model and tokenizer are saved to
``output_dir`` itself.

Every function here imports torch, transformers and TRL when called, never at import.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...trainers import check_arguments, last_checkpoint, make_trainer, trainer_arguments
from .models import ModelSpec, load_causal_lm, load_regression_model

# The paper's QFT: 1 epoch, packing, max length 256, learning rate 2e-5.
QFT_DEFAULTS: dict[str, Any] = {"num_train_epochs": 1, "packing": True, "max_length": 256, "learning_rate": 2e-5}
# The paper's QPO: learning rate 5e-7, beta 0.1, 1 epoch, batch 128 (= per device x accumulation x processes; 8 x 16
# on one process).
QPO_DEFAULTS: dict[str, Any] = {"learning_rate": 5e-7, "beta": 0.1, "num_train_epochs": 1,
                                "per_device_train_batch_size": 8, "gradient_accumulation_steps": 16}  # fmt: skip
# The difficulty scorer is not specified beyond "a regression on solver fail rates": a short, gentle fine-tune.
SCORER_DEFAULTS: dict[str, Any] = {"learning_rate": 1e-5, "num_train_epochs": 1, "per_device_train_batch_size": 8,
                                   "save_strategy": "no"}  # fmt: skip


def check_overrides(kind: str, overrides: Mapping[str, Any], path: str) -> None:
    """Check trainer-argument overrides by name and type when the config is read (``output_dir`` is the stage's).

    Raises:
        ConfigError: Unknown or reserved name, or a value of the wrong type.
    """
    check_arguments(kind, overrides, path, reserved=("output_dir",))


def make_args(kind: str, defaults: Mapping[str, Any], overrides: Mapping[str, Any], output_dir: str | os.PathLike):
    """The trainer arguments: ``defaults``, then ``overrides``, then ``output_dir`` (where checkpoints go); bf16
    chosen by the hardware unless set."""
    values = {**defaults, **overrides, "output_dir": str(output_dir)}
    return trainer_arguments(kind, values, hardware_precision=True, path="training")


def checkpoint_dir(output_dir: str | os.PathLike, run_key: str) -> Path:
    """Where the checkpoints of the training identified by ``run_key`` go."""
    return Path(output_dir) / "checkpoints" / (run_key[:16] or "run")


def _train_and_save(trainer: Any, tokenizer: Any, output_dir: str | os.PathLike) -> dict[str, Any]:
    result = trainer.train(resume_from_checkpoint=last_checkpoint(trainer.args.output_dir))
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(output_dir))
    metrics = {"train_loss": result.training_loss, "global_step": result.global_step,
               "train_runtime": result.metrics.get("train_runtime")}  # fmt: skip
    metrics["is_main_process"] = trainer.is_world_process_zero()
    return metrics


def free_memory() -> None:
    """Frees a finished stage's memory (its references must be gone) before the next stage loads its models."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_sft(
    rows: list[dict[str, str]],
    spec: ModelSpec,
    output_dir: str | os.PathLike,
    overrides: Mapping[str, Any],
    run_key: str = "",
) -> dict[str, Any]:
    """QFT: TRL ``SFTTrainer`` on prompt-completion rows; saves model and tokenizer to ``output_dir``.

    Args:
        rows: ``{"prompt", "completion"}`` rows (completions already end with the EOS text; TRL appends none).
        spec: The model to fine-tune.
        output_dir: Where checkpoints and the final model go.
        overrides: ``SFTConfig`` fields over :data:`QFT_DEFAULTS`.
        run_key: Identifies this training's checkpoints (the stage fingerprint).

    Returns:
        Training metrics, plus ``examples`` and ``examples_over_max_length``.
    """
    from datasets import Dataset

    args = make_args("sft", QFT_DEFAULTS, overrides, checkpoint_dir(output_dir, run_key))
    tokenizer, model = load_causal_lm(spec)
    over = _count_over(tokenizer, [r["prompt"] + r["completion"] for r in rows], args.max_length)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trainer = make_trainer("sft", model, tokenizer, args, dataset)
    metrics = _train_and_save(trainer, tokenizer, output_dir)
    del trainer, model
    free_memory()
    return {**metrics, "examples": len(rows), "examples_over_max_length": over, "max_length": args.max_length}


def train_dpo(
    rows: list[dict[str, str]],
    spec: ModelSpec,
    output_dir: str | os.PathLike,
    overrides: Mapping[str, Any],
    run_key: str = "",
) -> dict[str, Any]:
    """QPO: TRL ``DPOTrainer`` on prompt/chosen/rejected rows (the reference model is a frozen copy of the start).

    Args:
        rows: ``{"prompt", "chosen", "rejected"}`` rows.
        spec: The model to optimize (the QFT model).
        output_dir: Where checkpoints and the final model go.
        overrides: ``DPOConfig`` fields over :data:`QPO_DEFAULTS`.
        run_key: Identifies this training's checkpoints (the stage fingerprint).

    Returns:
        Training metrics, plus ``pairs``.
    """
    from datasets import Dataset

    args = make_args("dpo", QPO_DEFAULTS, overrides, checkpoint_dir(output_dir, run_key))
    tokenizer, model = load_causal_lm(spec)
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trainer = make_trainer("dpo", model, tokenizer, args, dataset)
    metrics = _train_and_save(trainer, tokenizer, output_dir)
    del trainer, model
    free_memory()
    return {**metrics, "pairs": len(rows)}


def train_regressor(
    texts: list[str],
    labels: list[float],
    spec: ModelSpec,
    output_dir: str | os.PathLike,
    overrides: Mapping[str, Any],
    max_length: int = 512,
    run_key: str = "",
) -> dict[str, Any]:
    """The difficulty scorer: a one-output sequence regression (MSE) on ``labels``; saves model and tokenizer.

    Args:
        texts: Inputs (questions).
        labels: Targets (fail rates in [0, 1]).
        spec: The base model (tiny, or a folder; a regression head is added when it has none).
        output_dir: Where the scorer goes.
        overrides: ``TrainingArguments`` fields over :data:`SCORER_DEFAULTS`.
        max_length: Tokens kept per text.
        run_key: Identifies this training's checkpoints.

    Returns:
        Training metrics, plus ``examples``.
    """
    from datasets import Dataset

    args = make_args("regression", SCORER_DEFAULTS, overrides, checkpoint_dir(output_dir, run_key))
    tokenizer, model = load_regression_model(spec)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    dataset = Dataset.from_dict({**encoded, "labels": [float(v) for v in labels]})
    trainer = make_trainer("regression", model, tokenizer, args, dataset)
    metrics = _train_and_save(trainer, tokenizer, output_dir)
    del trainer, model
    free_memory()
    return {**metrics, "examples": len(texts)}


def _count_over(tokenizer: Any, texts: list[str], max_length: int | None) -> int:
    if not max_length:
        return 0
    return sum(1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if len(ids) > max_length)
