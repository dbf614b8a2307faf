"""Tracking precision: under bf16 mixed precision the default tracks in bf16 (about 1e-3 relative), and
``precision="fp32"`` tracks in float32 (exact to fp32 rounding), leaving the model exactly as it was."""

from __future__ import annotations

import copy

import pytest
import test_architectures as architectures
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from test_engine import EVALS, PROBES, brute_grads, lora, rel_err, tiny_model

from swift_callbacks.influence import InfluenceEngine


def _reference(model):
    """Brute force on an fp32 copy without autocast (the true fp32 gradients)."""
    fp32 = copy.deepcopy(model).float()
    fp32.__dict__.pop("forward", None)  # drop accelerate's autocast wrapper from the copy
    P, E = brute_grads(fp32, PROBES), brute_grads(fp32, EVALS)
    return P @ E.T, (E * E).sum(1)


def _autocast_model(name):
    """An fp32 model prepared by accelerate for bf16 mixed precision (its forward runs under autocast)."""
    model = lora(tiny_model(seed=11), dropout=0.0) if name == "llama-lora" else architectures.build(name, "full")
    AcceleratorState._reset_state(reset_partial_state=True)  # a Trainer earlier in the session set it up
    try:
        return Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # leave no bf16 state to later tests


# GPT-2's Conv1D and Mixtral's router are replayed per example: the replay must run in the call's precision.
@pytest.mark.parametrize("name", ["llama-lora", "GPT-2", "Mixtral"])
def test_autocast_default_is_bf16_accurate_and_fp32_is_exact(name):
    model = _autocast_model(name)
    dot, norm = _reference(model)
    auto = InfluenceEngine(model, micro_batch_size=3).compute(PROBES, EVALS)
    err_auto = rel_err(auto.dot, dot)
    assert 1e-4 < err_auto <= 3e-2  # really ran in bf16, and still close
    exact = InfluenceEngine(model, micro_batch_size=3, precision="fp32").compute(PROBES, EVALS)
    assert rel_err(exact.dot, dot) <= 1e-4
    assert rel_err(exact.eval_sq_norm, norm) <= 1e-4
    assert "forward" in model.__dict__  # accelerate's wrapper is back in place
    ids = torch.tensor([PROBES[0]["input_ids"]])
    assert model(input_ids=ids).logits.dtype == torch.float32  # convert_outputs_to_fp32 still applies


def test_fp32_tracking_of_a_bf16_model_restores_it_bit_for_bit():
    model = lora(tiny_model(seed=12), dropout=0.0).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objects = {n: p for n, p in model.named_parameters()}
    dot, _ = _reference(model)
    result = InfluenceEngine(model, micro_batch_size=3, precision="fp32").compute(PROBES, EVALS)
    assert rel_err(result.dot, dot) <= 1e-4
    for name, p in model.named_parameters():
        assert p is objects[name] and p.dtype == torch.bfloat16
        assert torch.equal(p, before[name])


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision: must be one of"):
        InfluenceEngine(tiny_model(), precision="bf16")


@pytest.mark.parametrize("route", ["auto", "materialize", "ghost"])
def test_inside_an_autocast_region_the_model_runs_in_bf16_and_the_engine_math_in_fp32(route, monkeypatch):
    """``compute`` called inside ``torch.autocast``: the forward runs in bf16 as the caller asked, while the
    engine's own products stay float32 (under the caller's autocast they would silently run in bf16, and an
    embedding's squared norms crashed mixing the two)."""
    from swift_callbacks.influence import engine as engine_module

    model = architectures.build("Llama", "full")
    dot, _ = _reference(model)
    seen = []
    real = engine_module._dots
    monkeypatch.setattr(engine_module, "_dots", lambda *a: seen.append(real(*a)) or seen[-1])
    engine = InfluenceEngine(model, micro_batch_size=2, route=route)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = engine.compute(PROBES, EVALS)
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16  # restored
        fp32 = InfluenceEngine(model, micro_batch_size=2, route=route, precision="fp32").compute(PROBES, EVALS)
    assert seen and all(d.dtype == torch.float32 for d in seen)
    assert engine.verification.dtype == torch.float32  # the sample check ran in fp32 (see the next test)
    assert 1e-4 < rel_err(result.dot, dot) <= 3e-2  # the forward really ran in bf16, and is still close
    assert rel_err(fp32.dot, dot) <= 1e-4


def test_inside_an_autocast_region_the_verification_still_runs_in_fp32():
    """The sample check's tolerance follows the precision it ran in: under the caller's bf16 autocast it must still
    run (and be judged) in float32, not loosened to bf16's 5e-2."""
    engine = InfluenceEngine(architectures.build("Llama", "full"), micro_batch_size=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = engine.check(PROBES + EVALS)
    assert report.dtype == torch.float32 and report.tolerance == 1e-4


def test_inside_one_autocast_region_scores_follow_weights_changed_in_place():
    """Autocast's weight cache keeps, within one region, the bf16 copies of weights since changed in place (as an
    optimizer step changes them): the engine's forward must cast the current weights, not reuse those copies."""
    model = lora(tiny_model(seed=3), dropout=0.0)
    engine = InfluenceEngine(model, micro_batch_size=2, verify=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=torch.tensor([PROBES[0]["input_ids"]]))  # the caller's forward fills the cache
        engine.compute(PROBES, EVALS)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(3.0)
        after = engine.compute(PROBES, EVALS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = engine.compute(PROBES, EVALS)  # a new region: no cached copies
    assert rel_err(after.dot, fresh.dot) <= 1e-6  # the cached copies gave a relative error of 0.88 to fp32
    dot, _ = _reference(model)
    assert rel_err(after.dot, dot) <= 0.1  # bf16 on these larger gradients


def test_a_parameter_on_a_device_without_autocast_does_not_stop_tracking():
    """Autocast is switched off per device type the model's parameters are on; a type without autocast ("meta",
    where asking for its state raises) is skipped, not an error."""
    from swift_callbacks.influence.engine import _autocast_device_types

    model = tiny_model(seed=19)
    model.register_parameter("unused", torch.nn.Parameter(torch.empty(2, device="meta"), requires_grad=False))
    assert _autocast_device_types(model) == ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    result = InfluenceEngine(model, micro_batch_size=2, verify=False, precision="fp32").compute(PROBES, EVALS)
    P, E = brute_grads(model, PROBES), brute_grads(model, EVALS)
    assert rel_err(result.dot, P @ E.T) <= 1e-4
