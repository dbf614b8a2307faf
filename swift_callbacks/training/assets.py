"""The tokenizer, model and LoRA settings a training config names.

A Hub id or local folder goes through ``AutoTokenizer`` / ``AutoModelForCausalLM``; a ``tiny:`` spec builds the
offline tiny Llama and demo tokenizer of ``swift_callbacks.demo.tiny`` (deterministic, so every rank of a
multi-process run, and a later post-hoc scoring, builds the same model).
"""

from __future__ import annotations

from typing import Any

from .config import LoraSettings, ModelConfig

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def load_tokenizer(model: ModelConfig):
    """The tokenizer of ``model`` (the demo tokenizer for a ``tiny:`` spec)."""
    tiny_kwargs = model.tiny_kwargs
    if tiny_kwargs is not None:
        from ..demo import tiny

        return tiny.build_tokenizer(
            tiny.demo_corpus(),
            vocab_size=tiny_kwargs.get("vocab_size", 512),
            model_max_length=tiny_kwargs.get("max_position_embeddings", 256),
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        model.tokenizer or model.name_or_path, trust_remote_code=model.trust_remote_code, revision=model.revision
    )


def load_model(model: ModelConfig, tokenizer: Any, name_or_path: str | None = None):
    """The causal LM of ``model``.

    Call it after the ``SFTConfig`` exists: under ``accelerate launch`` with DeepSpeed ZeRO-3 or FSDP's
    low-memory loading, creating the training arguments is what tells ``from_pretrained`` to load the weights
    partitioned / on one rank only.

    Args:
        model: The model section.
        tokenizer: Its tokenizer (sizes the tiny model).
        name_or_path: Load from here instead of ``model.name_or_path`` (a full-weights checkpoint folder).
    """
    import torch

    tiny_kwargs = model.tiny_kwargs
    if tiny_kwargs is not None and name_or_path is None:
        from ..demo import tiny

        built = tiny.build_model(tokenizer, **{k: v for k, v in tiny_kwargs.items() if k != "vocab_size"})
        if model.dtype in _DTYPES:
            built = built.to(getattr(torch, _DTYPES[model.dtype]))
        return built
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": getattr(torch, _DTYPES[model.dtype]) if model.dtype in _DTYPES else "auto"}
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    if tiny_kwargs is None:
        kwargs.update(trust_remote_code=model.trust_remote_code, revision=model.revision)
    elif not model.attn_implementation:
        kwargs["attn_implementation"] = "eager"  # what the tiny builder uses
    return AutoModelForCausalLM.from_pretrained(name_or_path or model.name_or_path, **kwargs)


def lora_config(lora: LoraSettings | None):
    """A ``peft.LoraConfig`` for causal LM training, or None (full fine-tuning)."""
    if lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )  # fmt: skip
