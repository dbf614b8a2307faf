"""The engine against brute force: one ``torch.autograd.grad`` per example, flattened and dotted."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from swift_callbacks.configuration import ConfigError
from swift_callbacks.influence import InfluenceEngine
from swift_callbacks.influence.capture import Capture
from swift_callbacks.influence.engine import _Plan
from swift_callbacks.influence.features import Rows
from swift_callbacks.influence.modules import UnsupportedModelError

VOCAB = 97
TOL = 1e-4


def tiny_model(arch: str = "llama", tie: bool = True, seed: int = 0) -> torch.nn.Module:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kwargs))  # q/k/v projections have biases
    return LlamaForCausalLM(LlamaConfig(**kwargs))


def lora(model, targets="all-linear", dropout=0.1):
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout))
    with torch.no_grad():  # LoRA B starts at zero; give it values so every path carries gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def examples(lengths, prompt_len, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]})
    return out


PROBES = examples((7, 12, 5, 9, 16), 3, seed=1)
EVALS = examples((6, 10, 8), 2, seed=2)


def example_grads(model, exs, params) -> list[list[torch.Tensor]]:
    """Per example, float64 gradients of its summed completion cross-entropy w.r.t. ``params`` (one
    ``autograd.grad`` per example, the model in eval mode and put back as it was)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    rows = []
    for e in exs:
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor(e["labels"])
        logits = model(input_ids=ids).logits[0].float()
        loss = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
        rows.append([g.double() for g in torch.autograd.grad(loss, params)])
    for m, mode in modes:
        m.training = mode
    return rows


def brute_grads(model, exs, params=None):
    params = params or [p for p in model.parameters() if p.requires_grad]
    return torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in example_grads(model, exs, params)])


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def check(model, engine, probes=PROBES, evals=EVALS, params=None, tol=TOL):
    P, E = brute_grads(model, probes, params), brute_grads(model, evals, params)
    r = engine.compute(probes, evals)
    assert rel_err(r.dot, P @ E.T) <= tol
    assert rel_err(r.eval_sq_norm, (E * E).sum(1)) <= tol
    assert rel_err(r.probe_sq_norm, (P * P).sum(1)) <= tol
    assert r.probe_tokens.tolist() == [sum(x != -100 for x in e["labels"][1:]) for e in probes]
    return r


MODELS = {
    "lora-llama": lambda: lora(tiny_model()),
    "lora-qwen2-with-lm-head": lambda: lora(
        tiny_model("qwen2", tie=False), ["q_proj", "v_proj", "down_proj", "lm_head"]
    ),
    "full-llama-tied": lambda: tiny_model(tie=True),
    "full-qwen2-biases-untied": lambda: tiny_model("qwen2", tie=False),
}


@functools.cache
def model_for(name):
    return MODELS[name]()


@pytest.mark.parametrize("route", ["auto", "ghost", "materialize"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_brute_force(name, route):
    model = model_for(name)
    engine = InfluenceEngine(model, route=route, micro_batch_size=3)
    check(model, engine)
    if route != "auto":
        assert {b.route for b in engine.blocks if b.kind in {"linear", "embedding"}} == {route}


def test_full_finetuning_covers_every_parameter_kind():
    engine = InfluenceEngine(model_for("full-llama-tied"), route="ghost")
    kinds = {b.kind for b in engine.blocks}
    assert kinds == {"shared", "linear", "generic"}  # tied embedding/lm_head, projections, RMSNorm weights
    assert engine.num_tracked_params == sum(p.numel() for p in model_for("full-llama-tied").parameters())


def test_padding_and_batching_do_not_change_results():
    model = model_for("lora-llama")
    one = InfluenceEngine(model, micro_batch_size=1).compute(PROBES, EVALS)
    many = InfluenceEngine(model, micro_batch_size=5).compute(PROBES, EVALS)
    assert rel_err(many.dot, one.dot) <= 1e-5
    assert rel_err(many.eval_sq_norm, one.eval_sq_norm) <= 1e-5


def test_eval_chunking_under_memory_budget():
    model = model_for("lora-llama")
    full = InfluenceEngine(model).compute(PROBES, EVALS)
    tiny_budget = InfluenceEngine(model, max_feature_bytes=1)  # one held example per chunk
    assert tiny_budget._plan(PROBES, EVALS).chunk == 1
    assert rel_err(tiny_budget.compute(PROBES, EVALS).dot, full.dot) <= 1e-6


def test_param_filter_restricts_tracked_parameters():
    model = model_for("lora-llama")
    engine = InfluenceEngine(model, param_filter=r"down_proj\.lora_")
    params = [p for n, p in model.named_parameters() if p.requires_grad and "down_proj.lora_" in n]
    assert engine.num_tracked_params == sum(p.numel() for p in params)
    check(model, engine, params=params)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_enabled_in_train_mode(reentrant):
    model = lora(tiny_model(seed=3))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    check(model, InfluenceEngine(model, micro_batch_size=2))
    assert model.training


def test_hooks_firing_twice_under_activation_recomputation():
    """Force non-reentrant checkpointing even in eval mode: tracked hooks fire again in backward."""
    model = lora(tiny_model(seed=4), ["up_proj", "down_proj"])
    reference = InfluenceEngine(model, micro_batch_size=2).compute(PROBES, EVALS)
    fired = []
    for layer in model.base_model.model.model.layers:
        original = layer.mlp.forward
        layer.mlp.forward = functools.partial(torch.utils.checkpoint.checkpoint, original, use_reentrant=False)
    up = model.base_model.model.model.layers[0].mlp.up_proj.lora_A["default"]
    handle = up.register_forward_hook(lambda *a: fired.append(1))
    engine = InfluenceEngine(model, micro_batch_size=8, verify=False)  # count the tracking passes only
    with Capture(engine.blocks) as cap:  # the recording flag is what filters the replay
        assert not cap.recording
    P, E = brute_grads(model, PROBES), brute_grads(model, EVALS)
    fired.clear()
    result = engine.compute(PROBES, EVALS)
    handle.remove()
    assert len(fired) == 4  # (eval pass + probe pass) x (forward + recomputation)
    assert rel_err(result.dot, P @ E.T) <= TOL
    assert rel_err(result.dot, reference.dot) <= 1e-5


def test_training_state_untouched():
    model = lora(tiny_model(seed=5))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.tensor([PROBES[1]["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    grads = [p.grad.clone() for p in params]
    opt_state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    model.train()
    model.base_model.model.model.layers[1].eval()  # mixed modes must come back as they were
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    requires = [p.requires_grad for p in model.parameters()]
    InfluenceEngine(model).compute(PROBES, EVALS)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, params, strict=True))
    assert all(torch.equal(v, opt.state[params[0]][k]) for k, v in opt_state.items())
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(rng, torch.get_rng_state())
    assert [p.requires_grad for p in model.parameters()] == requires


def test_bf16_model_accumulates_in_fp32():
    model = lora(tiny_model(seed=6)).to(torch.bfloat16)
    r = InfluenceEngine(model, micro_batch_size=2).compute(PROBES, EVALS)
    assert r.dot.dtype == torch.float64 and torch.isfinite(r.dot).all()
    P, E = brute_grads(model, PROBES), brute_grads(model, EVALS)
    assert rel_err(r.dot, P @ E.T) <= 5e-2  # bf16 activations; brute force also runs in bf16


def test_no_tracked_parameter_is_a_clear_error():
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="No trainable parameter"):
        InfluenceEngine(model)
    with pytest.raises(ValueError, match="matches 'nothing'"):
        InfluenceEngine(tiny_model(), param_filter="nothing")


def test_a_verified_computation_costs_one_backward_per_micro_batch(monkeypatch):
    """The per-micro-batch check (verify=True) rides on the same backward; the per-example autograd oracle runs
    only in the sample verification. (A regression once ran one more backward per example in every micro-batch,
    ~6x the cost of a computation.)"""
    model = model_for("lora-llama")
    engine = InfluenceEngine(model, micro_batch_size=2)
    engine.compute(PROBES, EVALS)  # verifies once
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    engine.compute(PROBES, EVALS)
    assert len(calls) == -(-len(PROBES) // 2) + -(-len(EVALS) // 2)
    assert engine.sum_check_error > 0  # the check did run


class MeanScaledNorm(torch.nn.Module):
    """A norm whose scale also enters through its mean (when ``reduce``): a batched replay with one weight copy per
    example would average the copies and mix the examples' gradients (the per-example replay must be kept)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone())
        self.reduce = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * self.weight * self.weight.mean() if self.reduce else x * self.weight


def _norm_model(seed: int = 7):
    model = tiny_model(seed=seed)
    with torch.no_grad():
        for p in model.parameters():  # norm weights start at one; make every one distinct
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    layers = model.model.layers
    layers[0].input_layernorm = MeanScaledNorm(layers[0].input_layernorm.weight)
    return model, [p for n, p in model.named_parameters() if "norm" in n]


def test_batched_replay_of_norms_only_where_it_agrees_with_the_per_example_replay():
    model, params = _norm_model()
    layers = model.model.layers
    # Single examples first (no verification, whose batch would be judged first): one example cannot show mixing.
    single = InfluenceEngine(model, micro_batch_size=1, param_filter="norm", verify=False)
    check(model, single, params=params)  # the norms' products alone
    assert single._replay_verdicts.get(layers[0].input_layernorm, {"weight"}) is None
    engine = InfluenceEngine(model, micro_batch_size=3, param_filter="norm")
    check(model, engine, params=params)
    assert engine._replay_verdicts.get(layers[0].input_layernorm, {"weight"}) is False
    assert engine._replay_verdicts.get(layers[0].post_attention_layernorm, {"weight"}) is True
    assert engine._replay_verdicts.get(model.model.norm, {"weight"}) is True
    # The module's behaviour changes without a change the engine could see: judged again in the next computation.
    layers[0].input_layernorm.reduce = False
    check(model, engine, params=params)
    assert engine._replay_verdicts.get(layers[0].input_layernorm, {"weight"}) is True
    layers[0].input_layernorm.reduce = True
    check(model, engine, params=params)
    assert engine._replay_verdicts.get(layers[0].input_layernorm, {"weight"}) is False


class Scaled(torch.nn.Module):
    """An RMS norm with a chosen output form ``y = form(x_hat, weight[, bias])``."""

    def __init__(self, width: int, form, bias: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(width)
        self.weight = torch.nn.Parameter(torch.rand(width, generator=g) + 0.5)
        self.bias = torch.nn.Parameter(0.1 * torch.randn(width, generator=g)) if bias else None
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.form(x_hat, self.weight) if self.bias is None else self.form(x_hat, self.weight, self.bias)


NORM_FORMS = {  # form, with a bias, whether the batched replay must be judged right for it
    "proportional": (lambda x, w: x * w, False, True),
    "one plus weight (Gemma)": (lambda x, w: x * (1.0 + w), False, True),
    "with a bias": (lambda x, w, b: x * w + b, True, True),
    "squared weight": (lambda x, w: x * w * w, False, True),
    "weight through its mean": (lambda x, w: x * w * w.mean(), False, False),
}


@pytest.mark.parametrize("form", list(NORM_FORMS))
def test_each_norm_form_is_exact_and_batched_only_where_that_agrees(form):
    fn, bias, expected = NORM_FORMS[form]
    model = tiny_model(seed=11)
    module = Scaled(32, fn, bias)
    model.model.layers[1].post_attention_layernorm = module
    params = [p for n, p in model.named_parameters() if "post_attention" in n]
    engine = InfluenceEngine(model, micro_batch_size=2, param_filter="post_attention", verify=False)
    check(model, engine, params=params)
    assert engine._replay_verdicts.get(module, engine.blocks[-1].tracked(module)) is expected


class LateBias(Scaled):
    """Proportional to its scale on short sequences only: a fixed vector is added from position ``start`` on."""

    def __init__(self, width: int, start: int) -> None:
        super().__init__(width, lambda x, w: x * w)
        self.register_buffer("extra", 0.5 * torch.randn(width, generator=torch.Generator().manual_seed(3)))
        self.start = start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return torch.cat([y[:, : self.start], y[:, self.start :] + self.extra], dim=1)


class TwoOutputs(Scaled):
    """Proportional to its scale, returning outputs of different ranks: ``(y, y[:, 0])``."""

    def __init__(self, width: int) -> None:
        super().__init__(width, lambda x, w: x * w)

    def forward(self, x: torch.Tensor):
        y = super().forward(x)
        return y, y[:, 0]


class PooledLlama(torch.nn.Module):
    """A final norm returning two outputs, both used by the loss."""

    def __init__(self, model) -> None:
        super().__init__()
        self.inner, self.norm = model, TwoOutputs(32)
        model.model.norm = torch.nn.Identity()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden = self.inner.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        y, first = self.norm(hidden)
        return type("Out", (), {"logits": self.inner.lm_head(y + first[:, None])})()

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()


def test_norms_whose_form_changes_with_the_data_stay_exact():
    """The batched replay stays exact, without any verification, on a norm proportional to its scale on the
    shortest examples (the first micro-batch, where it is judged) with a term added on longer ones; a norm
    returning outputs of different ranks falls back to the per-example replay."""
    model = tiny_model(seed=14)
    module = LateBias(32, start=8)
    model.model.norm = module
    engine = InfluenceEngine(model, micro_batch_size=2, param_filter=r"model\.norm", verify=False)
    check(model, engine, params=[module.weight])
    pooled = PooledLlama(tiny_model(seed=15))
    engine = InfluenceEngine(pooled, micro_batch_size=2, param_filter=r"^norm", verify=False)
    P, E = brute_grads(pooled, PROBES, [pooled.norm.weight]), brute_grads(pooled, EVALS, [pooled.norm.weight])
    assert rel_err(engine.compute(PROBES, EVALS).dot, P @ E.T) <= TOL
    assert engine._replay_verdicts.get(pooled.norm, {"weight"}) is False


def test_the_engine_refuses_calls_from_inside_its_own_computation():
    """compute(), check() and option changes from a progress callback would use (or swap) that computation's
    buffers and blocks: each is refused with one line, and the engine is usable afterwards."""
    engine = InfluenceEngine(tiny_model(seed=16), micro_batch_size=2, verify=False)
    refused = []

    def progress(done: int, total: int) -> None:
        if refused:
            return
        for call in (lambda: engine.compute(PROBES, EVALS), lambda: engine.check(EVALS),
                     lambda: setattr(engine, "route", "ghost")):  # fmt: skip
            with pytest.raises(ConfigError, match="while a compute"):
                call()
            refused.append(call)

    engine.compute(PROBES, EVALS, progress=progress)
    assert len(refused) == 3 and engine.route == "auto"
    engine.compute(PROBES, EVALS)


def test_batched_replay_is_not_judged_on_examples_that_cannot_tell():
    """Identical examples (mixed gradients equal the true ones) and examples without supervised tokens (zero
    gradients) leave the module unjudged until a micro-batch that can tell."""
    model, params = _norm_model(seed=8)
    module = model.model.layers[0].input_layernorm
    twins = [dict(EVALS[0]), dict(EVALS[0])]
    unsupervised = [{"input_ids": e["input_ids"], "labels": [-100] * len(e["input_ids"])} for e in EVALS[1:]]
    engine = InfluenceEngine(model, micro_batch_size=2, param_filter="norm", verify=False)
    engine._replay_verdicts.clear()
    engine._choose_routes(2, 2, 8.0)
    with engine._tracking():
        for batch in (twins, unsupervised):
            engine._forward_backward(batch, rows=Rows(engine.blocks, 2))
            assert engine._replay_verdicts.get(module, {"weight"}) is None
    evals = [*twins, *unsupervised, *EVALS]  # length-sorted micro-batches put the twins together
    check(model, engine, evals=evals, params=params)
    assert engine._replay_verdicts.get(module, {"weight"}) is False


def test_an_embedding_scaled_by_token_frequency_is_refused():
    model = tiny_model(tie=False, seed=9)
    model.model.embed_tokens.scale_grad_by_freq = True
    with pytest.raises(UnsupportedModelError, match="scale_grad_by_freq"):
        InfluenceEngine(model)
    InfluenceEngine(model, param_filter=r"^(?!.*embed_tokens)")  # excluded: fine


@pytest.mark.parametrize("group_bytes", [1, 1 << 40])
def test_stream_groups_of_any_size_give_the_same_products(monkeypatch, group_bytes):
    """Streamed features (the probes' here) are multiplied with the held side a group at a time: one micro-batch
    per group (tiny limit) or all in one group (huge limit), on materialized and ghost blocks."""
    from swift_callbacks.influence import engine as engine_module

    monkeypatch.setattr(engine_module, "_STREAM_GROUP_BYTES", group_bytes)
    model = model_for("full-qwen2-biases-untied")
    for route in ("materialize", "ghost"):
        engine = InfluenceEngine(model, route=route, micro_batch_size=2, verify=False)
        assert engine._stream_group(len(PROBES), 4) == (2 if group_bytes == 1 else len(PROBES))
        check(model, engine)


def test_routes_count_bytes_so_the_evaluation_side_fits_one_chunk():
    """With a budget that holds the evaluation side only in ghost form, ``auto`` moves the blocks that save the
    most bytes to the ghost route (FLOPs alone chose materialize) instead of cutting the evaluation examples into
    chunks that each re-run every probe; the products stay exact."""
    model = model_for("full-qwen2-biases-untied")
    t_max = max(len(e["input_ids"]) for e in EVALS)  # the held side's longest
    roomy = InfluenceEngine(model, max_feature_bytes=1 << 40)
    roomy._choose_routes(len(PROBES), len(EVALS), 9.0)
    flops_only = {b.name: b.route for b in roomy.blocks}
    assert "materialize" in {flops_only[b.name] for b in roomy.blocks if b.kind == "linear"}
    ghost_bytes = sum(roomy._block_bytes(b, "ghost" if b.kind == "linear" else b.route, t_max) for b in roomy.blocks)
    engine = InfluenceEngine(model, max_feature_bytes=len(EVALS) * ghost_bytes)
    check(model, engine)
    moved = [b for b in engine.blocks if b.route != flops_only[b.name]]
    assert moved and all(b.route == "ghost" for b in moved)
    assert engine._plan(PROBES, EVALS) == _Plan(hold_evals=True, chunk=len(EVALS))


@pytest.mark.parametrize("route", ["materialize", "ghost"])
@pytest.mark.parametrize("many", ["evals", "probes"])
def test_the_side_that_costs_fewer_passes_is_held(many, route):
    """With a budget of two examples' features, the two probes are held and the nine evaluation examples are
    streamed past them once (11 forward/backward passes, not 9 + 5 chunks x 2), and the other way round; the
    products and norms are those of brute force either way. When both sides fit, the smaller one is held."""
    model = model_for("full-qwen2-biases-untied")
    few, lots = [PROBES[0], PROBES[2]], [*EVALS, *EVALS, *EVALS]
    probes, evals = (few, lots) if many == "evals" else (lots, few)
    engine = InfluenceEngine(model, route=route, micro_batch_size=2, verify=False)
    engine.max_feature_bytes = 2 * engine._example_bytes(16)
    assert engine._plan(probes, evals) == _Plan(hold_evals=many == "probes", chunk=2)
    seen = []
    engine.compute = functools.partial(engine.compute, progress=lambda done, total: seen.append((done, total)))
    check(model, engine, probes=probes, evals=evals)
    assert seen[-1] == (11, 11)
    engine.max_feature_bytes = 1 << 40  # both fit: the same passes either way, the fewer bytes are held
    assert engine._plan(probes, evals) == _Plan(hold_evals=many == "probes", chunk=2)


def test_each_side_is_costed_with_the_routes_fitted_for_it():
    """Long probes, short evaluation examples: held, the evaluations fit in chunks of 3 once their linear blocks
    take the ghost route (9 + 3 x 4 = 21 passes), while the probes would be held one per chunk (4 + 4 x 9 = 40).
    The plan compares the two with each side's own fitted routes, and the products stay exact."""
    model = model_for("full-llama-tied")
    probes, evals = examples((40,) * 4, 1, seed=5), examples((3,) * 9, 1, seed=6)
    engine = InfluenceEngine(model, max_feature_bytes=80_000, verify=False)  # costed by FLOP routes: 45 vs 40
    plan = engine._plan(probes, evals)
    assert plan.hold_evals and plan.chunk == 3
    seen = []
    engine.compute = functools.partial(engine.compute, progress=lambda done, total: seen.append(total))
    check(model, engine, probes=probes, evals=evals)
    assert seen[-1] == 21


def test_the_plan_sees_the_score_variant_set_up(monkeypatch):
    """A variant's set-up (projection matrices, Adam's scales) takes memory and fixes its feature sizes: with
    ``max_feature_bytes="auto"`` the free memory is read, and the held side sized, only after it ran."""
    model = model_for("lora-llama")
    engine = InfluenceEngine(model, max_feature_bytes="auto", score="projection", score_options={"dim": 8})
    order = []
    setup, budget = engine.variant.setup, engine._budget
    monkeypatch.setattr(engine.variant, "setup", lambda *a, **k: (order.append("setup"), setup(*a, **k))[1])
    monkeypatch.setattr(engine, "_budget", lambda: (order.append("budget"), budget())[1])
    engine.compute(PROBES, EVALS)
    assert order == ["setup", "budget"]


def test_token_budget_micro_batches():
    """``micro_batch_tokens`` caps examples x longest length per micro-batch (one long example may exceed it);
    the products are those of any other batching."""
    model = model_for("full-llama-tied")
    engine = InfluenceEngine(model, micro_batch_size=8, micro_batch_tokens=20)
    batches = list(engine._micro_batches(PROBES))  # lengths 7, 12, 5, 9, 16
    widths = [[len(PROBES[i]["input_ids"]) for i in b] for b in batches]
    assert widths == [[5, 7], [9], [12], [16]]
    assert all(len(w) * max(w) <= 20 for w in widths)
    check(model, engine)
    engine.micro_batch_tokens = 1  # below every length: one example per micro-batch
    assert [len(b) for b in engine._micro_batches(PROBES)] == [1] * len(PROBES)
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        engine.micro_batch_tokens = 0


def test_embedding_products_by_matched_rows_equal_the_dense_gradients():
    """Token-id features (repeated ids, padding positions with zero gradient, an id shared by no other example)
    against the dense per-example embedding gradients they stand for."""
    from swift_callbacks.influence.features import Ghost, pairwise, sq_norms

    g = torch.Generator().manual_seed(3)
    vocab, d = 11, 5
    ids = torch.randint(0, vocab, (4, 9), generator=g)
    ids[0, :4] = 7  # one id four times
    grads = torch.randn(4, 9, d, generator=g)
    grads[1, 6:] = 0.0  # padding
    ids[1, 6:] = 0
    other = Ghost(torch.randint(0, vocab, (3, 6), generator=g), torch.randn(3, 6, d, generator=g))
    x = Ghost(ids, grads)

    def dense(f):
        out = torch.zeros(len(f), vocab, d, dtype=torch.float64)
        out.scatter_add_(1, f.a.unsqueeze(-1).expand(-1, -1, d), f.g.double())
        return out.reshape(len(f), -1)

    assert torch.allclose(pairwise(x, other).double(), dense(x) @ dense(other).T, rtol=1e-5, atol=1e-6)
    assert torch.allclose(pairwise(x, x).double(), dense(x) @ dense(x).T, rtol=1e-5, atol=1e-6)
    assert torch.allclose(sq_norms(x).double(), (dense(x) ** 2).sum(1), rtol=1e-5, atol=1e-6)
    empty = Ghost(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, d))
    assert torch.equal(pairwise(empty, x), torch.zeros(2, 4)) and torch.equal(sq_norms(empty), torch.zeros(2))


def test_a_model_whose_forward_runs_other_modules_is_refused_not_zero():
    """A copy whose forward is still bound to the original model (as with a deep-copied TRL trainer) runs none of
    its own modules: every gradient would read as zero. The engine says so instead."""
    import copy

    original = tiny_model(seed=10)
    twin = copy.deepcopy(original)
    twin.forward = original.forward
    with pytest.raises(UnsupportedModelError, match="called none of the tracked modules"):
        InfluenceEngine(twin, verify=False).compute(PROBES, EVALS)
    with pytest.raises(UnsupportedModelError, match="called none of the tracked modules"):
        InfluenceEngine(twin).compute(PROBES, EVALS)


def test_feature_rows_kept_between_computations_are_written_afresh():
    """Small feature rows are reused by the next computation (no page faults for fresh memory); results of every
    computation stay exact, including one over other examples of the same sizes in between."""
    model = tiny_model(seed=13)
    engine = InfluenceEngine(model, micro_batch_size=2, verify=False)
    first = check(model, engine)
    held = engine._kept_rows["held"]
    others = [{"input_ids": e["input_ids"][::-1], "labels": e["labels"]} for e in PROBES]
    check(model, engine, probes=others, evals=[dict(e) for e in EVALS[::-1]])
    assert engine._kept_rows["held"] is held  # same capacity: the same memory
    again = check(model, engine)
    assert torch.equal(again.dot, first.dot) and torch.equal(again.probe_sq_norm, first.probe_sq_norm)
    engine.max_feature_bytes = 1  # one held example per chunk: one kept buffer serves every chunk in turn
    chunked = check(model, engine)
    assert rel_err(chunked.dot, first.dot) <= TOL
    engine.route = "ghost"  # ghost features are parts (views of activations): not kept past the computation
    check(model, engine)
    assert engine._kept_rows and not any(part for rows in engine._kept_rows.values() for part in rows._parts)


def test_no_hook_outlives_a_computation_even_one_interrupted():
    """The capture hooks stay attached over a whole side: they must all be gone after it, also when a progress
    callback raises mid-side."""
    model = tiny_model(seed=17)
    engine = InfluenceEngine(model, micro_batch_size=2, verify=False)

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = hooks()
    engine.compute(PROBES, EVALS)
    assert hooks() == before

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.compute(PROBES, EVALS, progress=interrupt)
    assert hooks() == before and not engine._computing
    check(model, engine)


class HookShy(torch.nn.Linear):
    """A projection whose forward refuses to run while forward hooks are attached to it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._forward_hooks:
            raise RuntimeError("hooks attached")
        return super().forward(x)


def test_a_failing_forward_is_blamed_on_the_model_or_on_the_hooks_as_tried():
    """A forward that fails without the engine names the model's call as the thing to fix; one that fails only
    with the capture hooks attached names them (and param_filter)."""
    model = tiny_model(seed=18)
    for layer in model.model.layers:  # reentrant checkpointing takes no keyword arguments: the model itself fails
        layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=True)
    with pytest.raises(UnsupportedModelError, match=r"also without the influence engine's hooks.*use_cache=False"):
        InfluenceEngine(model, micro_batch_size=2, verify=False).compute(PROBES, EVALS)
    model = tiny_model(seed=18)
    old = model.model.layers[0].mlp.down_proj
    shy = HookShy(old.in_features, old.out_features, bias=False)
    model.model.layers[0].mlp.down_proj = shy
    with pytest.raises(UnsupportedModelError, match="failed with the influence engine's hooks attached"):
        InfluenceEngine(model, micro_batch_size=2, verify=False).compute(PROBES, EVALS)
    model(input_ids=torch.tensor([PROBES[0]["input_ids"]]))  # and the model runs again: no hook left behind
