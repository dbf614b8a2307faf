"""Multi-process (torchrun, 2 ranks, gloo on CPU) runs of the engine and of the callback inside DDP training.

The sets have sizes not divisible by the world size, so ranks get padded shares; the gathered results must
equal a single-process computation, and only rank 0 may write the history.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    DDP_CONFIG,
    DDP_SAVED_STEPS,
    ENGINE_CONFIGS,
    assert_close_rel,
    build_model,
    ddp_callback_kwargs,
    engine_case,
    engine_on,
    examples_of,
    make_trainer,
    reload_checkpoint,
    torch_threads,
)

from swift_callbacks import load_pairs
from swift_callbacks.influence import distributed as dist_utils
from swift_callbacks.store import STORE_DIR, list_steps, store_dir

HERE = Path(__file__).resolve().parent
WORKER = HERE / "ddp_worker.py"
TIMEOUT_S = 240
RESULT_FIELDS = ["dot", "probe_sq_norm", "eval_sq_norm", "probe_loss", "eval_loss"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def torchrun(mode: str, out: Path) -> None:
    """Run ``ddp_worker.py MODE OUT`` on 2 CPU processes; fail with the workers' output if it does not succeed."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])),
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(WORKER), mode, str(out)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-4000:], (err.stderr or b"")[-4000:]
        pytest.fail(f"torchrun {mode} timed out after {TIMEOUT_S}s\n{tail}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun {mode} failed ({proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


# ---------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shard_equal_counts_and_coverage(world):
    for n in range(0, 20):
        shards = [dist_utils.shard(n, world, r) for r in range(world)]
        per_rank = -(-n // world)
        assert all(len(s) == per_rank for s in shards), (n, world, shards)
        flat = [i for s in shards for i in s]
        assert set(flat) == set(range(n)), (n, world, shards)
        assert all(0 <= i < n for i in flat)
        # Gathering in rank order and keeping first occurrences gives every example exactly once, in order.
        if n:
            order = dist_utils.first_positions(flat, n)
            assert [flat[p] for p in order.tolist()] == list(range(n))
        # Each share is a contiguous run of new examples, padded by repeating the last example of the set.
        seen = 0
        for s in shards:
            fresh = list(range(seen, min(n, seen + per_rank)))
            assert s == fresh + [n - 1] * (per_rank - len(fresh)), (n, world, shards)
            seen += len(fresh)


def test_shard_pads_with_last_example():
    assert dist_utils.shard(5, 2, 0) == [0, 1, 2]
    assert dist_utils.shard(5, 2, 1) == [3, 4, 4]
    assert dist_utils.shard(1, 2, 1) == [0]
    assert dist_utils.shard(3, 4, 3) == [2]
    assert dist_utils.shard(5, 4, 3) == [4, 4]


def test_first_positions_and_single_process_helpers():
    assert dist_utils.first_positions([3, 4, 4, 0, 1, 2], 5).tolist() == [3, 4, 5, 0, 1]
    with pytest.raises(RuntimeError, match=r"\[2\]"):
        dist_utils.first_positions([0, 1, 1], 3)
    assert not dist_utils.is_distributed()
    assert dist_utils.world_size() == 1 and dist_utils.rank() == 0
    obj = ([torch.ones(2)], "x")
    assert dist_utils.all_gather_cpu(obj) == [obj]


# --------------------------------------------------------------------------------- engine alone


@pytest.mark.slow
def test_engine_two_processes_equals_single_process(tmp_path):
    torchrun("engine", tmp_path)
    model = build_model(seed=0)
    single = {}
    for name in ENGINE_CONFIGS:
        kwargs, probes, evals = engine_case(name)
        engine = engine_on(model, **kwargs)
        single[name] = expected = engine.compute(probes, evals)
        assert expected.dot.shape == (len(probes), 5)
        assert engine._plan(probes, evals).hold_evals == (name != "held_probes")
        if name == "held_probes":  # the same products as with the evaluation examples held
            assert_close_rel(expected.dot, single["auto"].dot[: len(probes)], 1e-4, "held_probes/dot")
        for rank in (0, 1):  # every rank returns the full result
            got = torch.load(tmp_path / f"engine-rank{rank}.pt")[name]
            for field in RESULT_FIELDS:
                # 1e-4, the engine's bound against brute force: the ranks' micro-batches (and so the shapes of the
                # float32 products) differ from one process's, which changes the rounding (2.8e-5 seen).
                assert_close_rel(got[field], getattr(expected, field), 1e-4, f"{name}/{field}/rank{rank}")
            assert torch.equal(got["probe_tokens"], expected.probe_tokens)
            assert torch.equal(got["eval_tokens"], expected.eval_tokens)
    # One rank's forward fails: each rank raises (rank 1 its own error, rank 0 naming rank 1), and the next
    # computation is whole on both.
    ranks = [torch.load(tmp_path / f"engine-rank{rank}.pt")["one_rank_fails"] for rank in (0, 1)]
    for outcome in ranks[0]["outcomes"]:
        assert outcome.startswith("RankFailedError: Rank 1 failed") and "ZeroDivisionError" in outcome
    assert all("ZeroDivisionError" in o and not o.startswith("RankFailedError") for o in ranks[1]["outcomes"])
    for rank in ranks:
        assert_close_rel(rank["after"]["dot"], single["auto"].dot, 1e-4, "after a failure/dot")


# ------------------------------------------------------------------------------- DDP training run


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun("trainer", out)
    return out


@pytest.mark.slow
def test_ddp_history_written_once_by_rank_zero(ddp_run):
    run = ddp_run / "run"
    root = store_dir(run)
    assert list_steps(root) == DDP_SAVED_STEPS
    leftovers = sorted(p.name for p in (root / "pairs").iterdir())
    assert leftovers == [f"step-{s:09d}.parquet" for s in DDP_SAVED_STEPS], leftovers  # no temp files
    assert not (root / "superseded").exists()
    pairs = load_pairs(run)
    assert not pairs.duplicated(["step", "probe_set", "probe_id", "eval_set", "eval_id"]).any()
    assert len(pairs) == len(DDP_SAVED_STEPS) * 5 * 3
    for step in DDP_SAVED_STEPS:
        assert list_steps(run / f"checkpoint-{step}" / STORE_DIR) == [s for s in DDP_SAVED_STEPS if s <= step]
    # Both ranks logged the same (gathered) influence metrics.
    logs = [json.loads((ddp_run / f"logs-rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert [r["step"] for r in logs[0]] == DDP_SAVED_STEPS
    assert logs[0] == logs[1]


@pytest.mark.slow
def test_ddp_pairs_equal_single_process_on_checkpoint(ddp_run, tmp_path):
    run = ddp_run / "run"
    # The workers tokenized the sets exactly as a single-process trainer does.
    single = {k: v for k, v in DDP_CONFIG.items() if not k.startswith("ddp_")}
    _, cb = make_trainer(tmp_path, callback_kwargs=ddp_callback_kwargs(), **single)
    probes, evals = examples_of(cb)
    saved = json.loads((ddp_run / "examples.json").read_text(encoding="utf-8"))
    assert saved == {"probes": probes, "evals": evals}
    assert len(probes) == 5 and len(evals) == 3
    probe_ids, eval_ids = cb.probe_sets[0].ids, cb.eval_sets[0].ids
    pairs = load_pairs(run)
    for step in DDP_SAVED_STEPS:
        expected = engine_on(reload_checkpoint(run / f"checkpoint-{step}")).compute(probes, evals)
        at = pairs[pairs.step == step]
        rows = torch.tensor([probe_ids.index(i) for i in at.probe_id])
        cols = torch.tensor([eval_ids.index(i) for i in at.eval_id])
        assert_close_rel(at["dot"].to_numpy(), expected.dot[rows, cols], 1e-5, f"dot@{step}")
        assert_close_rel(at["probe_sq_norm"].to_numpy(), expected.probe_sq_norm[rows], 1e-5, f"probe_sq@{step}")
        assert_close_rel(at["eval_sq_norm"].to_numpy(), expected.eval_sq_norm[cols], 1e-5, f"eval_sq@{step}")
        assert_close_rel(at["probe_loss"].to_numpy(), expected.probe_loss[rows], 1e-5, f"probe_loss@{step}")
        assert_close_rel(at["eval_loss"].to_numpy(), expected.eval_loss[cols], 1e-5, f"eval_loss@{step}")
        relinf = expected.dot[rows, cols] / expected.eval_sq_norm[cols]
        assert_close_rel(at["relinf"].to_numpy(), relinf, 1e-5, f"relinf@{step}")
        assert (at["probe_tokens"].to_numpy() == expected.probe_tokens[rows].numpy()).all()


@pytest.mark.slow
def test_ddp_adam_scores_equal_single_process_with_the_same_optimizer_state(tmp_path):
    """The optimizer-preconditioned variant under DDP: every rank reads the same (replicated) Adam state; the
    recorded pairs equal a single process's computation on the checkpoint with that state."""
    torchrun("trainer_adam", tmp_path)
    single = {k: v for k, v in DDP_CONFIG.items() if not k.startswith("ddp_")}
    _, cb = make_trainer(tmp_path / "single", callback_kwargs=ddp_callback_kwargs(), **single)
    probes, evals = examples_of(cb)
    probe_ids, eval_ids = cb.probe_sets[0].ids, cb.eval_sets[0].ids
    pairs = load_pairs(tmp_path / "run")
    assert set(pairs["score"]) == {"adam"}
    logs = [json.loads((tmp_path / f"logs-rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert logs[0] == logs[1] and [r["step"] for r in logs[0]] == DDP_SAVED_STEPS
    for step in DDP_SAVED_STEPS:
        model = reload_checkpoint(tmp_path / "run" / f"checkpoint-{step}")
        dump = torch.load(tmp_path / f"adam-{step}.pt")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        ((beta2, eps),) = {(d["beta2"], d["eps"]) for d in dump.values()}
        opt = torch.optim.AdamW([p for _, p in named], betas=(0.9, beta2), eps=eps)
        for n, p in named:
            opt.state[p] = {"step": torch.tensor(dump[n]["step"]), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": dump[n]["exp_avg_sq"]}  # fmt: skip
        expected = engine_on(model, score="adam", micro_batch_size=2).compute(probes, evals, optimizer=opt)
        at = pairs[pairs.step == step]
        rows = torch.tensor([probe_ids.index(i) for i in at.probe_id])
        cols = torch.tensor([eval_ids.index(i) for i in at.eval_id])
        assert_close_rel(torch.tensor(at["dot"].to_numpy()), expected.dot[rows, cols], 1e-4, f"dot@{step}")
