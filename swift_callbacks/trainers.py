"""The one place trainers are made: trainer arguments (checked by name and type), LoRA settings and trainers.

Three kinds, each a TRL / transformers trainer with its arguments class: ``"sft"`` (``trl.SFTTrainer`` /
``SFTConfig``: ``swift-study train``, ``score``, the demo, ScaleQuest's QFT), ``"dpo"`` (``trl.DPOTrainer`` /
``DPOConfig``: ScaleQuest's QPO) and ``"regression"`` (``transformers.Trainer`` / ``TrainingArguments``: the
difficulty scorer). torch, transformers and TRL are imported when a function is called.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from .configuration import ConfigError, check_type, join, suggest

KINDS = ("sft", "dpo", "regression")


def arguments_class(kind: str) -> type:
    """The trainer-arguments class of a training kind."""
    if kind == "sft":
        from trl import SFTConfig

        return SFTConfig
    if kind == "dpo":
        from trl import DPOConfig

        return DPOConfig
    if kind == "regression":
        from transformers import TrainingArguments

        return TrainingArguments
    raise ConfigError(f"unknown training kind {kind!r}; expected one of {', '.join(KINDS)}")


@functools.cache
def argument_types(kind: str) -> dict[str, Any]:
    """Field names and type hints of the kind's arguments class (the keys a trainer section accepts)."""
    cls = arguments_class(kind)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation this Python cannot evaluate: names are checked, the class checks values
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def check_arguments(kind: str, values: Mapping[str, Any], path: str, *, reserved: Sequence[str] = ()) -> None:
    """Check trainer arguments from a config by name and type, before any training starts.

    Args:
        kind: ``sft``, ``dpo`` or ``regression``.
        values: The section's mapping.
        path: Key path of the section, for messages.
        reserved: Names the caller sets itself (refused here, e.g. ``output_dir`` of a pipeline stage).

    Raises:
        ConfigError: Unknown or reserved name, or a value of the wrong type (the message names the key path).
    """
    fields = argument_types(kind)
    for key in values:
        if key not in fields:
            cls = arguments_class(kind).__name__
            raise ConfigError(f"{join(path, str(key))}: unknown {cls} argument; {suggest(str(key), list(fields))}")
    for key, value in values.items():
        if key in reserved:
            raise ConfigError(f"{join(path, key)}: set by swift_callbacks, remove it")
        check_type(value, fields[key], join(path, key))


def trainer_arguments(kind: str, values: Mapping[str, Any], *, hardware_precision: bool = False, path: str = ""):
    """The arguments object of ``kind`` from ``values``.

    Args:
        kind: ``sft``, ``dpo`` or ``regression``.
        values: Field values (``output_dir`` included).
        hardware_precision: Unless ``bf16`` / ``fp16`` is given, use bf16 where the CUDA device supports it and
            fp32 elsewhere (one config for a GPU and a CPU); no logging backend unless ``report_to`` is given.
        path: Key path of ``values`` in the config, for messages.

    Raises:
        ConfigError: The class rejected a value (e.g. ``bf16: true`` on a machine without bf16 support).
    """
    values = dict(values)
    if hardware_precision:
        import torch

        if "bf16" not in values and "fp16" not in values:
            values["bf16"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        values.setdefault("report_to", "none")
    cls = arguments_class(kind)
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path or kind}: {cls.__module__.split('.')[0]}.{cls.__name__} rejected it: {err}") from err


def lora_config(r: int, alpha: int, dropout: float, target_modules: list[str] | str, task_type: str = "CAUSAL_LM"):
    """A ``peft.LoraConfig``."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type=task_type)


def make_trainer(
    kind: str,
    model: Any,
    tokenizer: Any,
    args: Any,
    train_dataset: Any,
    *,
    eval_dataset: Any = None,
    peft_config: Any = None,
    callbacks: Sequence[Any] = (),
):
    """The trainer of ``kind`` (for ``regression``, with a padding collator over tokenized rows)."""
    common = dict(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                  processing_class=tokenizer, callbacks=list(callbacks) or None)  # fmt: skip
    if kind == "sft":
        from trl import SFTTrainer

        return SFTTrainer(**common, peft_config=peft_config)
    if kind == "dpo":
        from trl import DPOTrainer

        return DPOTrainer(**common, peft_config=peft_config)
    if kind == "regression":
        from transformers import DataCollatorWithPadding, Trainer

        if peft_config is not None:
            raise ConfigError("a regression trainer takes no PEFT config")
        return Trainer(**common, data_collator=DataCollatorWithPadding(tokenizer))
    raise ConfigError(f"unknown training kind {kind!r}; expected one of {', '.join(KINDS)}")


def last_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` (None when there is none or no folder)."""
    import os

    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
