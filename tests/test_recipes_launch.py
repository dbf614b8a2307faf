"""A tiny recipe end to end under ``accelerate launch`` with 2 CPU processes, then scored post hoc.

    accelerate launch --config_file recipes/accelerate_configs/cpu_ddp.yaml \\
        -m swift_callbacks.training.train --config recipes/cot/config_tiny_cpu.yaml --set ...

The run must really have 2 ranks (the config exists because MULTI_CPU / --cpu silently start one), write the
history once, and its checkpoints scored post hoc in one process must give the inline numbers (<= 1e-5 relative);
scoring skips the steps a history already has.
"""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import torch_threads
from recipe_runs import accelerate_launch, assert_same_history

from swift_callbacks import load_metrics, load_pairs
from swift_callbacks.scoring import score_run
from swift_callbacks.store import STORE_DIR, list_steps, step_path, store_dir

pytestmark = pytest.mark.slow
INLINE_STEPS = [0, 2, 4]  # at_step_zero, then the saves of a 4-step run saving every 2 steps
CHECKPOINT_STEPS = [2, 4]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("cot-ddp") / "run"
    log = accelerate_launch("cot", out)
    return out, log


def test_two_ranks_ran_and_rank_zero_wrote_the_history(launched):
    run, log = launched
    info = json.loads((run / "swift_run.json").read_text(encoding="utf-8"))
    assert info["world_size"] == 2, info
    assert info["influence_tracked"] is True
    # Each rank logs every influence computation: 3 computations x 2 ranks.
    assert log.count("swift influence at step") == 2 * len(INLINE_STEPS), log[-3000:]
    assert list_steps(store_dir(run)) == INLINE_STEPS
    assert sorted(p.name for p in (store_dir(run) / "pairs").iterdir()) == [
        step_path(store_dir(run), s).name for s in INLINE_STEPS
    ]  # no temporary files left by a second writer
    for step in CHECKPOINT_STEPS:
        assert list_steps(run / f"checkpoint-{step}" / STORE_DIR) == [s for s in INLINE_STEPS if s <= step]
    assert (run / "swift_train_config.yaml").exists()
    assert {"CoT → In-task non-CoT", "non-CoT → Cross-task non-CoT"} <= set(load_metrics(run).metric)


def test_posthoc_scores_equal_inline_scores(launched, tmp_path):
    run, _ = launched
    out = tmp_path / "posthoc"
    # No --config: the run's own swift_train_config.yaml is used.
    assert score_run(run, output_dir=out) == CHECKPOINT_STEPS
    inline = load_pairs(run)
    assert_same_history(load_pairs(out), inline[inline.step.isin(CHECKPOINT_STEPS)], rtol=1e-5)
    assert set(load_metrics(out).metric) == set(load_metrics(run).metric)


def test_posthoc_skips_steps_already_scored(launched, tmp_path):
    run, _ = launched
    before = {s: step_path(store_dir(run), s).read_bytes() for s in INLINE_STEPS}
    assert score_run(run) == []  # scored inline: nothing to do, nothing rewritten
    assert {s: step_path(store_dir(run), s).read_bytes() for s in INLINE_STEPS} == before
    # An interrupted post-hoc scoring that recorded step 2 continues with step 4 only.
    out = tmp_path / "partial"
    step_path(store_dir(out), 2).parent.mkdir(parents=True)
    shutil.copy2(step_path(store_dir(run), 2), step_path(store_dir(out), 2))
    assert score_run(run, output_dir=out) == [4]
    assert step_path(store_dir(out), 2).read_bytes() == before[2]
    assert list_steps(store_dir(out)) == CHECKPOINT_STEPS


@pytest.mark.parametrize("study", ["clarify", "evaluation"])
def test_other_tiny_recipes_run_under_cpu_ddp(study, tmp_path):
    run = tmp_path / "run"
    accelerate_launch(study, run)
    info = json.loads((run / "swift_run.json").read_text(encoding="utf-8"))
    assert info["world_size"] == 2
    assert list_steps(store_dir(run)) == INLINE_STEPS
    prefix = {"clarify": "Clarify", "evaluation": "EvalPos"}[study]
    assert any(m.startswith(f"{prefix} → Cross-task") for m in load_metrics(run).metric)
