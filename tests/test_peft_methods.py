"""PEFT methods beyond LoRA, and models whose forward the engine's hooks could change: exact or refused clearly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from test_engine import EVALS, PROBES, VOCAB, check, tiny_model
from torch import nn

from swift_callbacks.influence import InfluenceEngine
from swift_callbacks.influence.modules import UnsupportedModelError
from swift_callbacks.influence.verify import VerificationError


def _perturbed(model):
    with torch.no_grad():  # adapters often start at an identity; move them so every path carries gradient
        for i, (_, p) in enumerate(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return model


def test_prefix_tuning_is_exact():
    model = _perturbed(get_peft_model(tiny_model(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)))
    check(model, InfluenceEngine(model, micro_batch_size=3))


def test_prompt_tuning_virtual_tokens_are_refused():
    model = get_peft_model(tiny_model(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(UnsupportedModelError, match=r"'default' \(PROMPT_TUNING\) prepends virtual tokens"):
        InfluenceEngine(model)


@pytest.mark.parametrize(
    "config",
    [
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        LoHaConfig(target_modules=["q_proj", "up_proj"], r=2),  # its custom autograd.Function defeats vmap
        LoKrConfig(target_modules=["q_proj", "up_proj"], r=2),
        LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]),
    ],
    ids=["ia3", "loha", "lokr", "lora-embedding"],
)
def test_adapters_kept_in_parameter_dicts_are_exact(config):
    """These adapters live in ParameterDicts that are never called; the layer that reads them is replayed."""
    model = _perturbed(get_peft_model(tiny_model(), config))
    engine = InfluenceEngine(model, micro_batch_size=3)
    check(model, engine)
    assert engine.verification.complete


def test_dora_is_refused():
    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(UnsupportedModelError, match="DoRA adapter"):
        InfluenceEngine(model)


class SharedPositions(nn.Module):
    """Position embeddings computed once for the batch, shape (1, T, d), as GPT-2 does; with ``pool`` the model
    then sums them over the batch axis, which only works while that axis has length 1."""

    def __init__(self, pool: bool, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pool = pool
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(64, d)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        pos = self.pos(torch.arange(input_ids.shape[1]).unsqueeze(0))
        if self.pool:
            pos = pos.sum(0, keepdim=True)
        h = torch.cumsum(torch.tanh(self.embed(input_ids) + pos), dim=1)
        return SimpleNamespace(logits=self.head(h))


def test_shared_position_embeddings_are_exact():
    model = SharedPositions(pool=False)
    check(model, InfluenceEngine(model, micro_batch_size=3))


def test_hooks_that_would_change_the_function_are_caught():
    model = SharedPositions(pool=True)
    with pytest.raises(VerificationError, match="with the engine's hooks attached the model computes different"):
        InfluenceEngine(model, micro_batch_size=3).compute(PROBES, EVALS)
