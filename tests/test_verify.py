"""The engine's self-verification: it catches reconstructions that disagree with autograd, before any number."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_engine import EVALS, PROBES, VOCAB, check, lora, tiny_model
from torch import nn

from swift_callbacks.influence import InfluenceEngine, features
from swift_callbacks.influence.verify import VerificationError


class Mixer(nn.Module):
    """Embedding -> a Linear on token rows given in a permuted order -> head.

    With ``permute``, the rows of the whole micro-batch are shuffled before the layer and put back after: the
    layer sees exactly batch * width rows, so row counts cannot reveal that rows of different examples are
    mixed; only what the layer does can. With ``direct``, a second weight is read without calling its module.
    """

    def __init__(self, permute: bool = False, direct: bool = False, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.permute, self.direct = permute, direct
        self.embed = nn.Embedding(VOCAB, d)
        self.rows = nn.Linear(d, d)
        self.side = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.embed(input_ids)
        b, t, d = h.shape
        flat = h.reshape(b * t, d)
        if self.permute:
            perm = torch.arange(b * t).flip(0)
            out = torch.empty_like(flat)
            out[perm] = self.rows(flat[perm])
        else:
            out = self.rows(flat)
        h = h + torch.cumsum(torch.tanh(out).reshape(b, t, d), dim=1)
        h = h + (h @ self.side.weight.T if self.direct else self.side(h))
        return SimpleNamespace(logits=self.head(h))


def test_rows_mixed_across_examples_are_caught():
    model = Mixer(permute=True)
    with pytest.raises(VerificationError, match=r"parameter 'rows\.\w+'.*examples interact"):
        InfluenceEngine(model, micro_batch_size=3).compute(PROBES, EVALS)
    check(Mixer(), InfluenceEngine(Mixer(), micro_batch_size=3))  # the same layer fed rows in order is exact


def test_weight_read_without_a_module_call_is_caught():
    model = Mixer(direct=True)
    with pytest.raises(VerificationError, match=r"parameter 'side\.weight'.*summed over a micro-batch.*param_filter"):
        InfluenceEngine(model, micro_batch_size=3).compute(PROBES, EVALS)
    kept = [p for n, p in model.named_parameters() if not n.startswith("side.")]
    check(model, InfluenceEngine(model, param_filter=lambda n: not n.startswith("side."), micro_batch_size=3),
          params=kept)  # fmt: skip


def test_a_wrong_rule_is_caught_before_any_number(monkeypatch):
    model = lora(tiny_model(seed=7))
    original = features._materialize_call

    def off_by_one_percent(module, call, tracked, batch_size, width):
        return {k: v * 1.01 for k, v in original(module, call, tracked, batch_size, width).items()}

    monkeypatch.setattr(features, "_materialize_call", off_by_one_percent)
    engine = InfluenceEngine(model, route="materialize", micro_batch_size=3)
    with pytest.raises(VerificationError, match=r"by 9\.90e-03 \(relative; tolerance 1e-04 for float32\)"):
        engine.compute(PROBES, EVALS)
    assert engine.verification is None  # nothing passed, nothing returned


def test_verification_runs_once_then_again_when_modules_change():
    model = tiny_model(seed=8)
    engine = InfluenceEngine(model, micro_batch_size=3)
    engine.compute(PROBES, EVALS)
    first = engine.verification
    assert first is not None and first.examples == 3 and first.max_error["batch_sum"] <= 1e-4
    engine.compute(PROBES, EVALS)
    assert engine.verification is first  # same model, same routes: not re-run
    model.model.layers[0].mlp.forward = model.model.layers[0].mlp.forward  # an instance-level patch is a change
    engine.compute(PROBES, EVALS)
    assert engine.verification is not first


def test_every_save_and_off():
    model = tiny_model(seed=9)
    always = InfluenceEngine(model, micro_batch_size=3, verify="every_save")
    always.compute(PROBES, EVALS)
    first = always.verification
    always.compute(PROBES, EVALS)
    assert always.verification is not first
    off = InfluenceEngine(model, micro_batch_size=3, verify=False)
    off.compute(PROBES, EVALS)
    assert off.verification is None
    with pytest.raises(ValueError, match="verify must be"):
        InfluenceEngine(model, verify="sometimes")


def test_check_on_demand_reports_errors_per_check():
    engine = InfluenceEngine(lora(tiny_model(seed=10)), micro_batch_size=3)
    report = engine.check(PROBES)
    assert set(report.max_error) == {"forward", "batch_sum", "alone", "interaction"}
    assert all(0 <= v <= report.tolerance for v in report.max_error.values())
    assert report.seconds > 0


def test_blocks_without_gradient_are_checked_again_later():
    """At step 0 LoRA's B is zero, so A gets no gradient and its check passes trivially: verify again later."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(seed=12), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    engine = InfluenceEngine(model, micro_batch_size=3)
    engine.compute(PROBES, EVALS)
    first = engine.verification
    assert first.unchecked and all("lora_A" in name for name in first.unchecked)
    with torch.no_grad():  # a training step's worth of change: B leaves zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    engine.compute(PROBES, EVALS)
    second = engine.verification
    assert second is not first and second.complete
    engine.compute(PROBES, EVALS)
    assert engine.verification is second  # complete: not repeated
