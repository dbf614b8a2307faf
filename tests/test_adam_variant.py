"""The optimizer-preconditioned score variant ('adam') against autograd's per-example gradients divided by an
independently computed Adam preconditioner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_engine import EVALS, PROBES, lora, tiny_model
from test_projection import per_param_grads, rel_err

from swift_callbacks import ConfigError, InfluenceCallback
from swift_callbacks.influence import InfluenceEngine


def trained_adam(model, steps: int = 3, **kwargs) -> torch.optim.Optimizer:
    """An AdamW that has taken ``steps`` steps on a few examples (so it has second moments)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, **kwargs)
    for exs in (PROBES[:2], EVALS[:2], PROBES[2:4])[:steps]:
        opt.zero_grad()
        loss = 0
        for e in exs:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            loss = loss + F.cross_entropy(logits[:-1], torch.tensor(e["labels"][1:]), ignore_index=-100)
        loss.backward()
        opt.step()
    opt.zero_grad()
    return opt


def preconditioner(model, opt, name: str, eps: float | None = None) -> torch.Tensor:
    param = model.get_parameter(name)
    state, group = opt.state[param], next(g for g in opt.param_groups if any(p is param for p in g["params"]))
    beta2, step = group["betas"][1], int(state["step"])
    v_hat = state["exp_avg_sq"].double() / (1 - beta2**step)
    return 1.0 / (v_hat.sqrt() + (group["eps"] if eps is None else eps))


@pytest.mark.parametrize("held", ["evals", "probes"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_adam_scores_are_preconditioned_probe_gradients_dotted_with_plain_eval_gradients(kind, held):
    """Only the probe side is preconditioned, whichever side's features the engine holds (with a budget of one
    example, two probes against three evaluation examples hold the probes: 2 + 2 x 3 passes, not 3 + 3 x 2)."""
    torch.manual_seed(0)
    model = lora(tiny_model(seed=2), dropout=0.0) if kind == "lora" else tiny_model("qwen2", tie=False, seed=2)
    opt = trained_adam(model, betas=(0.9, 0.95), eps=1e-6)
    engine = InfluenceEngine(model, score="adam", max_feature_bytes=1 if held == "probes" else "2GiB")
    probes = PROBES[:2] if held == "probes" else PROBES
    assert engine._plan(probes, EVALS).hold_evals == (held == "evals")
    result = engine.compute(probes, EVALS, optimizer=opt)
    assert {b.route for b in engine.blocks} == {"materialize"}
    names = [n for b in engine.blocks for n in b.param_names]
    probe, evals = per_param_grads(model, probes), per_param_grads(model, EVALS)
    p = torch.cat([(probe[n] * preconditioner(model, opt, n)).reshape(len(probes), -1) for n in names], dim=1)
    e = torch.cat([evals[n].reshape(len(EVALS), -1) for n in names], dim=1)
    assert rel_err(result.dot, p @ e.T) <= 1e-4
    assert rel_err(result.eval_sq_norm, (e * e).sum(1)) <= 1e-4  # the RelInf denominator stays plain
    assert rel_err(result.probe_sq_norm, (p * p).sum(1)) <= 1e-4
    custom = InfluenceEngine(model, score="adam", score_options={"eps": 1e-3}).compute(probes, EVALS, optimizer=opt)
    p3 = torch.cat([(probe[n] * preconditioner(model, opt, n, 1e-3)).reshape(len(probes), -1) for n in names], 1)
    assert rel_err(custom.dot, p3 @ e.T) <= 1e-4
    assert all(int(opt.state[model.get_parameter(n)]["step"]) == 3 for n in names)  # the state is only read


def test_adam_refuses_what_it_cannot_read():
    model = lora(tiny_model(seed=2), dropout=0.0)
    engine = InfluenceEngine(model, score="adam")
    with pytest.raises(ConfigError, match=r"reads the live optimizer's state"):
        engine.compute(PROBES, EVALS)
    fresh = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ConfigError, match=r"holds no Adam state for it yet \(no optimizer step has been taken\)"):
        engine.compute(PROBES, EVALS, optimizer=fresh)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    trained = trained_adam(model)
    sgd.step()
    with pytest.raises(ConfigError, match=r"holds no Adam state"):
        engine.compute(PROBES, EVALS, optimizer=sgd)
    partial = torch.optim.AdamW([[p for p in model.parameters() if p.requires_grad][-1]])
    with pytest.raises(ConfigError, match=r"does not hold it \(a sharded optimizer"):
        engine.compute(PROBES, EVALS, optimizer=partial)
    with pytest.raises(ConfigError, match=r"eps must be a number > 0"):
        InfluenceEngine(model, score="adam", score_options={"eps": -1})
    assert engine.compute(PROBES, EVALS, optimizer=trained).dot.isfinite().all()


def test_adam_in_training_reads_the_trainers_optimizer_and_is_recorded(tmp_path):
    from helpers import make_trainer, torch_threads

    from swift_callbacks import load_pairs

    with torch_threads(1):
        trainer, _ = make_trainer(tmp_path, callback_kwargs={"score": "adam"}, max_steps=2, save_steps=2, n_train=16)
        trainer.train()
        assert set(load_pairs(tmp_path)["score"]) == {"adam"}
        with pytest.raises(ConfigError, match=r"does not exist before the first step: drop at_step_zero"):
            InfluenceCallback(trainer, probe_sets={"p": [{"prompt": "a", "completion": "b"}]},
                              eval_sets={"e": [{"prompt": "a", "completion": "b"}]}, score="adam",
                              at_step_zero=True)  # fmt: skip
