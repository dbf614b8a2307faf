"""The engine's self-verification: it catches reconstructions that disagree with autograd, before any number."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_engine import EVALS, PROBES, VOCAB, check, examples, lora, tiny_model
from torch import nn

from swift_callbacks.influence import InfluenceEngine, features, verify
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


class _BatchShapedBackward(torch.autograd.Function):
    """Identity forward; a backward that differs by 1e-3 relative between a batch and a lone example, as a deep
    fp32 model's backward differs by rounding between batch shapes (4e-4 measured on SmolLM2's first layer)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * (1.001 if grad.shape[0] > 1 else 1.0)


class BatchShaped(Mixer):
    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.rows(self.embed(input_ids))
        h = _BatchShapedBackward.apply(h)
        return SimpleNamespace(logits=self.head(torch.cumsum(torch.tanh(self.side(h)), dim=1)))


def test_the_models_own_batch_shape_rounding_is_not_called_an_interaction():
    """The interaction oracle is autograd in the same micro-batch, not the example alone: a model whose gradients
    differ between batch shapes (the engine exact on both) passes, and the difference is reported, not hidden."""
    engine = InfluenceEngine(BatchShaped(), micro_batch_size=3)
    report = engine.check(PROBES)
    assert report.max_error["interaction"] < 1e-5
    assert report.batch_vs_alone == pytest.approx(2e-3, rel=0.05)  # (1.001^2 - 1) on the blocks before the point
    engine.compute(PROBES, EVALS)  # and the computation is not refused


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

    def off_by_one_percent(*args, **kwargs):
        return {k: v * 1.01 for k, v in original(*args, **kwargs).items()}

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
    with pytest.raises(ValueError, match="verify: must be"):
        InfluenceEngine(model, verify="sometimes")


def test_check_on_demand_reports_errors_per_check():
    engine = InfluenceEngine(lora(tiny_model(seed=10)), micro_batch_size=3)
    report = engine.check(PROBES)
    assert set(report.max_error) == {"forward", "batching", "batch_sum", "alone", "interaction"}
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


class Sided(nn.Module):
    """Embedding -> ``side`` (a weight read without a module call, feeding a zero-initialised ``up``) -> head.

    ``special``: ids >= 90 also add rows of a table that is read directly, so only examples with such ids touch it.
    ``table``: a gated layer that takes a shared (T, d) table as its second argument.
    """

    def __init__(self, special: bool = False, table: bool = False, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, d)
        self.side = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.up.weight)
        self.special = nn.Embedding(VOCAB - 90, d) if special else None
        self.gate = GatedByTable(d) if table else None
        self.register_buffer("positions", torch.sin(torch.arange(64.0)[:, None] / (1 + torch.arange(float(d)))))
        self.head = nn.Linear(d, VOCAB, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.embed(input_ids)
        if self.special is not None:
            rows = torch.nn.functional.embedding((input_ids - 90).clamp_min(0), self.special.weight)
            h = h + rows * (input_ids >= 90)[..., None]
        if self.gate is not None:
            h = self.gate(h, self.positions[: h.shape[1]])
        h = torch.cumsum(torch.tanh(h + self.up(torch.tanh(h @ self.side.weight.T))), dim=1)
        return SimpleNamespace(logits=self.head(h))


class GatedByTable(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1, 1, d))

    def forward(self, x, table):
        return x * torch.sigmoid(self.weight * table)


def test_a_path_that_opens_after_the_first_check_is_caught():
    """While ``up`` is zero, ``side`` gets no gradient and its check passes trivially; when training opens the
    path, the batch-sum check that runs on every micro-batch catches the missing gradient."""
    model = Sided()
    engine = InfluenceEngine(model, micro_batch_size=3)
    for _ in range(3):
        engine.compute(PROBES, EVALS)
    assert "side" in engine.verification.unchecked
    with torch.no_grad():
        model.up.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(VerificationError, match=r"parameter 'side\.weight'"):
        engine.compute(PROBES, EVALS)


def test_inputs_absent_from_the_sample_are_still_checked():
    model = Sided(special=True)
    with torch.no_grad():
        model.up.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    below = lambda e: {"input_ids": [x % 90 for x in e["input_ids"]], "labels": e["labels"]}  # noqa: E731
    probes, evals = [below(e) for e in PROBES], [below(e) for e in EVALS]
    probes[1]["input_ids"][3:5] = [93, 95]  # only this example, which the sample does not take, has them
    assert all(e is not probes[1] for e in verify.sample([*probes, *evals]))
    engine = InfluenceEngine(model, micro_batch_size=3, param_filter=lambda n: not n.startswith("side."))
    with pytest.raises(VerificationError, match=r"'special\.weight'.*in a micro-batch of this computation"):
        engine.compute(probes, evals)


def test_the_sample_prefers_examples_with_supervised_tokens():
    unsupervised = [{"input_ids": e["input_ids"], "labels": [-100] * len(e["labels"])} for e in PROBES]
    chosen = verify.sample([*unsupervised, *EVALS])
    assert all(any(x != -100 for x in e["labels"]) for e in chosen)


def test_a_shared_table_is_not_mistaken_for_examples_when_batch_equals_width():
    model = Sided(table=True)
    with torch.no_grad():
        model.up.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    params = [p for n, p in model.named_parameters() if not n.startswith("side.")]
    evals = examples((3, 3, 2), 1, seed=3)  # one micro-batch of 3 examples, 3 tokens wide
    check(model, InfluenceEngine(model, micro_batch_size=3, param_filter=lambda n: not n.startswith("side.")),
          evals=evals, params=params)  # fmt: skip


def test_bf16_tracking_is_verified_in_fp32(monkeypatch):
    """A rule wrong by 3% hides under a bf16 tolerance; the verification runs in fp32 and catches it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    model = Accelerator(mixed_precision="bf16", cpu=True).prepare_model(lora(tiny_model(seed=13), dropout=0.0))
    AcceleratorState._reset_state(reset_partial_state=True)
    original = features._materialize_call
    monkeypatch.setattr(features, "_materialize_call", lambda *a: {k: v * 1.03 for k, v in original(*a).items()})
    with pytest.raises(VerificationError, match="tolerance 1e-04 for float32"):
        InfluenceEngine(model, route="materialize", micro_batch_size=3).compute(PROBES, EVALS)


class PaddingSensitive(nn.Module):
    """A normalisation over the padded time axis: an example's loss depends on how much padding it gets."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, d)
        self.lin = nn.Linear(d, d)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.lin(self.embed(input_ids))
        h = h - h.mean(dim=1, keepdim=True)
        return SimpleNamespace(logits=self.head(torch.cumsum(h, dim=1)))


def test_a_model_that_depends_on_padding_is_refused_for_what_it_is():
    with pytest.raises(VerificationError, match="loss computed inside a padded micro-batch differs from its loss"):
        InfluenceEngine(PaddingSensitive(), micro_batch_size=3).compute(PROBES, EVALS)


def test_a_tied_weight_is_tracked_whole_when_either_name_matches():
    model = tiny_model(tie=True)
    engine = InfluenceEngine(model, param_filter="lm_head", micro_batch_size=3)
    (block,) = engine.blocks
    assert block.kind == "shared" and len(block.modules) == 2  # the embedding and the head
    check(model, engine, params=[model.model.embed_tokens.weight])


@pytest.mark.parametrize(
    ("example", "message"),
    [
        ({"input_ids": [], "labels": []}, "has no tokens"),
        ({"input_ids": [1, 2, 3], "labels": [1, 2]}, "has 2 labels for 3 tokens"),
        ({"input_ids": [1, VOCAB], "labels": [1, 2]}, "has token ids outside the vocabulary"),
        ({"input_ids": [1, 2], "labels": [-100, VOCAB + 5]}, "has labels outside the vocabulary"),
    ],
)
def test_malformed_examples_get_one_clear_line(example, message):
    with pytest.raises(ValueError, match=f"evaluation example at position 1 {message}"):
        InfluenceEngine(tiny_model()).compute(PROBES, [EVALS[0], example])
