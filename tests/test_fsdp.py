"""The engine on FSDP2- and FSDP1-sharded models (torchrun, 2 ranks, gloo on CPU) against single-process oracles.

Two oracles on the unsharded model: brute force (one ``torch.autograd.grad`` per example w.r.t. every trainable
parameter, flattened and dotted; float32, so entries agree to ~1e-7 of the largest, and small entries only to
~1e-5 of themselves), and the engine itself with the same settings in a single process, which the sharded run must
match entry by entry. Set sizes (5 probes, 3 evaluation examples) do not divide by the world size, so ranks get
padded shares; every rank must return the full result, identical on both.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import fsdp_worker as worker
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel, torch_threads

from swift_callbacks.influence import InfluenceEngine

TOL = 1e-5  # relative to the largest entry of a result field
ENTRY_TOL = 1e-4  # relative to each entry (with assert_close_rel's floor of 1e-3 of the largest)
BRUTE_FIELDS = ("dot", "probe_sq_norm", "eval_sq_norm")
RESULT_FIELDS = ("dot", "probe_sq_norm", "eval_sq_norm", "probe_loss", "eval_loss")


def brute_grads(model: torch.nn.Module, examples: list[dict]) -> torch.Tensor:
    """Per-example flattened gradients (float64 rows), one backward per example, eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    rows = []
    for e in examples:
        logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0].float()
        loss = F.cross_entropy(logits[:-1], torch.tensor(e["labels"][1:]), ignore_index=-100, reduction="sum")
        rows.append(torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


@functools.cache
def model_for(variant: str) -> torch.nn.Module:
    return worker.build(variant)


@functools.cache
def brute_force(variant: str) -> dict[str, torch.Tensor]:
    probes, evals = worker.examples()
    with torch_threads(1):
        P, E = brute_grads(model_for(variant), probes), brute_grads(model_for(variant), evals)
    return {"dot": P @ E.T, "probe_sq_norm": (P * P).sum(1), "eval_sq_norm": (E * E).sum(1)}


@functools.cache
def single_process(variant: str, config: str) -> dict[str, torch.Tensor]:
    """The engine on the unsharded model with the engine settings ``config`` (JSON), in this process."""
    probes, evals = worker.examples()
    with torch_threads(1):
        result = InfluenceEngine(model_for(variant), **json.loads(config)).compute(probes, evals)
    return worker.result_dict(result)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest deviation relative to the largest expected magnitude."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def run_worker(mode: str, out: Path, env: dict[str, str] | None = None) -> list[dict]:
    code, log = worker.torchrun(mode, out, env=env)
    if code != 0:
        pytest.fail(f"torchrun {mode} failed ({code})\n{log}")
    return [torch.load(out / f"{mode}-rank{r}.pt") for r in (0, 1)]


def check_results(ranks: list[dict], prefixes: tuple[str, ...]) -> dict[str, float]:
    """Every config's results equal both oracles, and each other across ranks.

    Returns:
        The worst relative errors, relative to the largest entry vs brute force (``brute``) and vs the
        single-process engine (``engine``), and entry by entry vs the single-process engine (``entry``).
    """
    payload = ranks[0]
    names = [n for n in payload["results"] if n.startswith(prefixes)]
    assert names
    worst = {"brute": 0.0, "engine": 0.0, "entry": 0.0}
    for name in names:
        variant = name.split("/")[1]
        got = payload["results"][name]
        assert got["dot"].shape == (worker.N_PROBE, worker.N_EVAL), name
        brute = brute_force(variant)
        for field in BRUTE_FIELDS:
            err = rel_err(got[field], brute[field])
            assert err <= TOL, f"{name}/{field}: rel err {err:.3g} vs brute force"
            worst["brute"] = max(worst["brute"], err)
        single = single_process(variant, json.dumps(payload["configs"][name], sort_keys=True))
        for field in RESULT_FIELDS:
            err = rel_err(got[field], single[field])
            assert err <= TOL, f"{name}/{field}: rel err {err:.3g} vs the single-process engine"
            worst["engine"] = max(worst["engine"], err)
            # Entry by entry too: ranks batch and pad examples differently than one process does, which moves
            # float32 sums by ~1e-7 of the largest entry; an entry 100x smaller than the largest may move by 1e-5.
            assert_close_rel(got[field], single[field], ENTRY_TOL, f"{name}/{field} vs single process")
            entry = float(((got[field] - single[field]).abs() / single[field].abs()).max())
            worst["entry"] = max(worst["entry"], entry)
        assert torch.equal(got["probe_tokens"], single["probe_tokens"]), name
        assert torch.equal(got["eval_tokens"], single["eval_tokens"]), name
        for field, value in got.items():  # every rank returns the same full result
            assert torch.equal(ranks[1]["results"][name][field], value), f"{name}/{field} differs across ranks"
    return worst


def check_flags(ranks: list[dict], prefixes: tuple[str, ...]) -> None:
    for rank, payload in enumerate(ranks):
        checks = {n: c for n, c in payload["checks"].items() if n.startswith(prefixes)}
        assert checks
        for name, flags in checks.items():
            failed = {k: v for k, v in flags.items() if v is False}
            assert not failed, f"rank {rank} {name}: {failed}"


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> list[dict]:
    return run_worker("fsdp", tmp_path_factory.mktemp("fsdp"))


@pytest.mark.slow
def test_fsdp2_matches_oracles(fsdp_run):
    names = set(fsdp_run[0]["results"])
    for variant in worker.VARIANTS:
        assert {f"fsdp2/{variant}/{route}" for route in worker.ROUTES} <= names
    special = ("full-untied/chunked", "full-tied/no-reshard", "full-tied/built-unsharded", "full-tied/checkpointed")
    assert {f"fsdp2/{name}" for name in (*special, "full-untied/built-before-sharding")} <= names
    print("fsdp2 worst rel err", check_results(fsdp_run, ("fsdp2/",)))


@pytest.mark.slow
def test_fsdp2_leaves_training_state_alone(fsdp_run):
    """``.grad`` stays None (or bit-identical when set), parameters are resharded DTensors again, modes restored,
    the next optimizer step is bit-identical, and gradient reduction stays off even for unused parameters."""
    check_flags(fsdp_run, ("fsdp2/",))
    checks = fsdp_run[0]["checks"]
    for key in ("fsdp2/lora/grads", "fsdp2/full-tied/training", "fsdp2/lora/reduce-unused", "fsdp2/full-tied/bf16"):
        assert key in checks
    assert checks["fsdp2/full-tied/built-unsharded"]["root_unsharded"]


@pytest.mark.slow
def test_fsdp1_matches_oracles(fsdp_run):
    names = set(fsdp_run[0]["results"])
    for variant in worker.VARIANTS:
        assert {f"fsdp1/{variant}/{route}" for route in worker.ROUTES} <= names
    print("fsdp1 worst rel err", check_results(fsdp_run, ("fsdp1/",)))


@pytest.mark.slow
def test_fsdp1_leaves_training_state_alone_and_needs_the_root(fsdp_run):
    check_flags(fsdp_run, ("fsdp1/",))
    assert fsdp_run[0]["checks"]["fsdp1/inner-module"]["refused"]
    assert fsdp_run[0]["checks"]["fsdp1/wrapped-after-set-up"]["refused"]
