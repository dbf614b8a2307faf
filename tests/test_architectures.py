"""The architecture matrix: tiny models of many Hugging Face causal-LM families, each under full fine-tuning,
LoRA on all linear layers and LoRA with ``modules_to_save``, against a brute-force per-example autograd oracle.

Every cell must be exact (relative error <= 1e-4 in fp32) or refused with a named reason (an
``UnsupportedModelError``, which includes a failed self-verification). Refusals are listed in ``REFUSED``: a new
refusal, a refusal that went away, a raw exception or a silently wrong number fails the test. When the whole
matrix runs, its outcomes are written to ``docs/architectures.md``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from test_engine import brute_grads, examples, rel_err

from swift_callbacks.influence import InfluenceEngine
from swift_callbacks.influence.modules import UnsupportedModelError

VOCAB, TOL = 97, 1e-4
DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
_DECODER = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def _decoder(config_cls, model_cls, **extra):
    return lambda: model_cls(config_cls(**{**_DECODER, **extra}))


FAMILIES = {
    "Llama": _decoder(tf.LlamaConfig, tf.LlamaForCausalLM),
    "Mistral": _decoder(tf.MistralConfig, tf.MistralForCausalLM),
    "Qwen2": _decoder(tf.Qwen2Config, tf.Qwen2ForCausalLM, tie_word_embeddings=False),
    "Qwen3": _decoder(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=8),
    "Gemma": _decoder(tf.GemmaConfig, tf.GemmaForCausalLM, head_dim=8),
    "Gemma2": _decoder(tf.Gemma2Config, tf.Gemma2ForCausalLM, head_dim=8),
    "Gemma3": _decoder(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, head_dim=8),
    "Phi3": _decoder(tf.Phi3Config, tf.Phi3ForCausalLM),
    "Phi": _decoder(tf.PhiConfig, tf.PhiForCausalLM),
    "StableLM": _decoder(tf.StableLmConfig, tf.StableLmForCausalLM),
    "Starcoder2": _decoder(tf.Starcoder2Config, tf.Starcoder2ForCausalLM),
    "Granite": _decoder(tf.GraniteConfig, tf.GraniteForCausalLM),
    "Cohere": _decoder(tf.CohereConfig, tf.CohereForCausalLM),
    "OLMo2": _decoder(tf.Olmo2Config, tf.Olmo2ForCausalLM),
    "Mixtral": _decoder(tf.MixtralConfig, tf.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2),
    "Qwen2-MoE": _decoder(
        tf.Qwen2MoeConfig,
        tf.Qwen2MoeForCausalLM,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
    ),
    "GPT-2": lambda: tf.GPT2LMHeadModel(
        tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    ),
    "GPT-Neo": lambda: tf.GPTNeoForCausalLM(
        tf.GPTNeoConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=8,
            max_position_embeddings=64,
        )
    ),
    "GPT-NeoX": lambda: tf.GPTNeoXForCausalLM(
        tf.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    ),
    "GPT-J": lambda: tf.GPTJForCausalLM(
        tf.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64)
    ),
    "OPT": lambda: tf.OPTForCausalLM(
        tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            pad_token_id=1,
        )
    ),
    "Falcon": lambda: tf.FalconForCausalLM(
        tf.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=True,
            num_kv_heads=2,
        )
    ),
    "Bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
}

MODES = {
    "full": None,
    "lora": dict(target_modules="all-linear"),
    "lora+save": dict(target_modules="all-linear", modules_to_save=["lm_head"]),
}

# Cells refused on purpose, with the reason the refusal must name.
REFUSED = {
    ("Mixtral", "lora"): "target_parameters",
    ("Mixtral", "lora+save"): "target_parameters",
}


PROBES = examples((7, 12, 5, 9), 3, seed=1)
EVALS = examples((6, 10, 8), 2, seed=2)


def build(family: str, mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FAMILIES[family]().float()
    with torch.no_grad():  # norm scales and biases away from their initial ones and zeros, as after training
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    if MODES[mode] is None:
        return model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **MODES[mode]))
    with torch.no_grad():  # LoRA B starts at zero; give it values so every path carries gradient
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    return model


@pytest.fixture(scope="module")
def outcomes():
    table: dict[tuple[str, str], str] = {}
    yield table
    if len(table) == len(FAMILIES) * len(MODES):  # the whole matrix ran: record it
        _write_doc(table)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cell(family, mode, outcomes):
    model = build(family, mode)
    try:
        result = InfluenceEngine(model, micro_batch_size=3).compute(PROBES, EVALS)
    except UnsupportedModelError as err:
        reason = str(err)
        outcomes[(family, mode)] = f"refused: {_short(reason)}"
        expected = REFUSED.get((family, mode))
        assert expected is not None, f"{family}/{mode} newly refused: {reason}"
        assert expected in reason
        return
    assert (family, mode) not in REFUSED, f"{family}/{mode} is no longer refused: update REFUSED and the docs"
    P, E = brute_grads(model, PROBES), brute_grads(model, EVALS)
    err = max(rel_err(result.dot, P @ E.T), rel_err(result.eval_sq_norm, (E * E).sum(1)),
              rel_err(result.probe_sq_norm, (P * P).sum(1)))  # fmt: skip
    outcomes[(family, mode)] = f"exact ({err:.0e})"
    assert err <= TOL, f"{family}/{mode}: relative error {err:.2e} against brute force"


def _short(reason: str) -> str:
    reason = re.sub(r"\s+", " ", reason)
    return reason[:140] + ("…" if len(reason) > 140 else "")


def _write_doc(table: dict[tuple[str, str], str]) -> None:
    lines = [
        "# Architecture matrix",
        "",
        "Generated by `python -m pytest tests/test_architectures.py` (do not edit by hand). Each cell is a tiny",
        "model of the family built from its config (2 layers, width 32, fp32; every one-dimensional parameter, such as",
        "a norm's scale or a bias, moved off its initial value by N(0, 0.1²)), 4 probe x 3 evaluation examples of",
        "different lengths, micro-batches of 3, the engine's self-verification on. *exact (e)*: the largest relative",
        "error of the inner products and squared norms against a brute-force oracle (one `torch.autograd.grad` per",
        "example over every trainable tensor) is `e`; *refused*: the engine raised a clear error before returning",
        "any number. Modes: `full` = full fine-tuning; `lora` = PEFT LoRA r=4 on all linear layers;",
        "`lora+save` = the same plus `modules_to_save=['lm_head']`.",
        "",
        f"transformers {tf.__version__}, torch {torch.__version__}.",
        "",
        "| family | " + " | ".join(MODES) + " |",
        "|---|" + "---|" * len(MODES),
    ]
    for family in FAMILIES:
        lines.append(f"| {family} | " + " | ".join(table[(family, m)] for m in MODES) + " |")
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n", encoding="utf-8")
