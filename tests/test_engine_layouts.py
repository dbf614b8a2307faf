"""Module layouts beyond the standard decoder: reused layers, flattened token rows, and clear refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_engine import EVALS, PROBES, VOCAB, check
from torch import nn

from swift_callbacks.influence import InfluenceEngine
from swift_callbacks.influence.modules import UnsupportedModelError


class ToyLM(nn.Module):
    """Embedding -> a Linear applied twice -> a Linear on flattened (B*T, d) rows -> a gated norm -> head."""

    def __init__(self, d: int = 16, gated: bool = False, routed: bool = False) -> None:
        super().__init__()
        self.routed = routed
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, d)
        self.twice = nn.Linear(d, d)
        self.flat = nn.Linear(d, d)
        self.norm = GatedScale(d) if gated else nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.embed(input_ids)
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        b, t, d = h.shape
        rows = h.reshape(b * t, d)
        if self.routed:  # like a routed expert: only some token rows reach the layer
            kept = self.flat(rows[: b * t // 2 + 1])
            flat = torch.cat([kept, kept.new_zeros(b * t - kept.shape[0], d)])
        else:
            flat = self.flat(rows)
        h = h + torch.cumsum(flat.reshape(b, t, d), dim=1)  # causal mixing
        h = self.norm(h, h) if isinstance(self.norm, GatedScale) else self.norm(h)
        return SimpleNamespace(logits=self.head(h))


class GatedScale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x, gate):
        return x * torch.sigmoid(gate) * self.weight


@pytest.mark.parametrize("route", ["auto", "ghost", "materialize"])
def test_layer_used_twice_and_flattened_rows(route):
    model = ToyLM()
    engine = InfluenceEngine(model, route=route, micro_batch_size=3)
    check(model, engine)


def test_module_with_two_tensor_inputs_is_replayed_exactly():
    model = ToyLM(gated=True)  # a gated norm: its parameters' gradients depend on both of its inputs
    check(model, InfluenceEngine(model, micro_batch_size=3))


def test_rows_that_cannot_be_attributed_are_refused():
    model = ToyLM(routed=True)
    with pytest.raises(UnsupportedModelError, match=r"'flat' was called on \d+ rows for a micro-batch of"):
        InfluenceEngine(model).compute(PROBES, EVALS)
