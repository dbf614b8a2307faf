"""End-to-end: InfluenceCallback inside real (tiny, CPU, LoRA) SFTTrainer runs.

* training is bit-identical with and without the callback;
* an interrupted-and-resumed run has the same history and parameters as an uninterrupted one, also when the
  interrupted run got past the checkpoint it is resumed from, or is resumed in a fresh output_dir;
* with gradient accumulation the recorded scores are those of the saved checkpoint's model;
* the logged metrics reach TensorBoard.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
from helpers import (
    StopAt,
    assert_close_rel,
    assert_params_equal,
    engine_on,
    examples_of,
    losses,
    make_trainer,
    reload_checkpoint,
    torch_threads,
    trainable_params,
)

from swift_callbacks import load_pairs, load_scores
from swift_callbacks.store import STORE_DIR, list_steps, step_path, store_dir

pytestmark = pytest.mark.slow

KEY = ["step", "probe_set", "probe_id", "eval_set", "eval_id"]
EXACT = ["probe_task", "eval_task", "paired", "probe_tokens", "eval_tokens"]
FLOAT = ["dot", "eval_sq_norm", "relinf", "probe_sq_norm", "cosine", "probe_loss", "eval_loss"]
# Entries of log_history that are timings, not training results.
TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "swift/seconds"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def sorted_pairs(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(KEY, kind="stable").reset_index(drop=True)


def assert_pairs_equal(actual: pd.DataFrame, expected: pd.DataFrame, rtol: float = 1e-6) -> None:
    """Same rows (keys, tasks, masks, token counts) and float columns equal within ``rtol``."""
    a, e = sorted_pairs(actual), sorted_pairs(expected)
    assert not a.duplicated(KEY).any(), "duplicate pairs in the history"
    assert len(a) == len(e)
    pd.testing.assert_frame_equal(a[KEY + EXACT], e[KEY + EXACT], check_dtype=False)
    for col in FLOAT:
        assert_close_rel(a[col].to_numpy(), e[col].to_numpy(), rtol, col)


def train_logs(log_history) -> list[dict]:
    """Training-loop records (no influence metrics, no timings)."""
    return [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in log_history
        if not any(k.startswith("swift/") for k in r)
    ]


# ----------------------------------------------------------------------------------- bit-identical


@pytest.fixture(scope="module")
def with_and_without(tmp_path_factory):
    """The same 20-step run (LoRA dropout on) with the callback busy at every step it can be, and without."""
    config = {"save_steps": 5, "max_steps": 20}
    runs = {}
    for name, callback in (("with", True), ("without", False)):
        out = tmp_path_factory.mktemp(f"bitident-{name}")
        trainer, _ = make_trainer(
            out, callback=callback, callback_kwargs={"at_step_zero": True, "every_n_steps": 3}, **config
        )
        trainer.train()
        runs[name] = {"out": out, "params": trainable_params(trainer.model), "log": trainer.state.log_history}
    return runs


def test_params_bit_identical_with_and_without_callback(with_and_without):
    runs = with_and_without
    assert_params_equal(runs["with"]["params"], runs["without"]["params"])
    # The callback really ran: step 0, every 3 steps and at every save.
    assert list_steps(store_dir(runs["with"]["out"])) == [0, 3, 5, 6, 9, 10, 12, 15, 18, 20]


def test_training_logs_identical_with_and_without_callback(with_and_without):
    """Same training-loss records (every logging step present, same values) with the callback as without.

    Regression: the callback logs through ``Trainer.log`` from ``on_step_end``, whose ``CallbackHandler.on_log``
    clears ``control.should_log``; at a step that is both an influence step and a logging step the training
    loss record was dropped (and the next one averaged over twice as many steps).
    """
    with_log, without_log = with_and_without["with"]["log"], with_and_without["without"]["log"]
    assert [s for s, _ in losses(without_log)] == [5, 10, 15, 20]
    assert [s for s, _ in losses(with_log)] == [5, 10, 15, 20]
    assert losses(with_log) == losses(without_log)
    assert train_logs(with_log) == train_logs(without_log)


# ----------------------------------------------------------------------------------------- resume

RESUME_CONFIG = {"save_steps": 5, "max_steps": 20}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("run-a")
    trainer, _ = make_trainer(out, **RESUME_CONFIG)
    trainer.train()
    return {"out": out, "params": trainable_params(trainer.model), "log": trainer.state.log_history}


def test_resume_equals_uninterrupted(uninterrupted, tmp_path):
    """Stopped right after checkpoint-10 (as if killed there), resumed from it in the same output_dir."""
    trainer, _ = make_trainer(tmp_path, extra_callbacks=[StopAt(10)], **RESUME_CONFIG)
    trainer.train()
    assert trainer.state.global_step == 10
    assert list_steps(store_dir(tmp_path)) == [5, 10]
    trainer, _ = make_trainer(tmp_path, **RESUME_CONFIG)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    assert trainer.state.global_step == 20
    assert list_steps(store_dir(tmp_path)) == [5, 10, 15, 20]
    assert not (store_dir(tmp_path) / "superseded").exists()
    assert_pairs_equal(load_pairs(tmp_path), load_pairs(uninterrupted["out"]))
    assert_params_equal(trainable_params(trainer.model), uninterrupted["params"])
    assert losses(trainer.state.log_history) == losses(uninterrupted["log"])


@pytest.fixture(scope="module")
def past_checkpoint(tmp_path_factory):
    """The interrupted run got to step 15 (history 5, 10, 15; checkpoints 5, 10, 15), then resumes from 10.

    Training is deterministic here, so to tell the abandoned branch from the resumed one, the abandoned
    checkpoint-15 sidecar's step-15 file is marked (relinf = -1) before resuming; it stands in for a branch that
    diverged (other data, a non-deterministic kernel). Resuming from checkpoint-10 never reads that file.
    """
    out = tmp_path_factory.mktemp("past-checkpoint")
    trainer, _ = make_trainer(out, extra_callbacks=[StopAt(15)], **RESUME_CONFIG)
    trainer.train()
    assert trainer.state.global_step == 15
    before = list_steps(store_dir(out))
    side15 = step_path(out / "checkpoint-15" / STORE_DIR, 15)
    marked = pd.read_parquet(side15)
    marked["relinf"] = -1.0
    marked.to_parquet(side15, index=False)
    trainer, _ = make_trainer(out, **RESUME_CONFIG)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-10"))
    assert trainer.state.global_step == 20
    return {"out": out, "before": before, "params": trainable_params(trainer.model)}


def test_resume_before_last_recorded_step_supersedes_it(uninterrupted, past_checkpoint):
    out = past_checkpoint["out"]
    assert past_checkpoint["before"] == [5, 10, 15]
    root = store_dir(out)
    assert list_steps(root) == [5, 10, 15, 20]
    superseded = sorted(p.relative_to(root / "superseded").as_posix() for p in (root / "superseded").rglob("*"))
    assert superseded == ["resumed-at-10", "resumed-at-10/step-000000015.parquet"]
    pairs = load_pairs(out)
    assert sorted(pairs.step.unique().tolist()) == [5, 10, 15, 20]
    assert_pairs_equal(pairs, load_pairs(uninterrupted["out"]))
    assert_params_equal(past_checkpoint["params"], uninterrupted["params"])


def test_resaved_checkpoint_sidecar_is_refreshed(past_checkpoint):
    """A checkpoint re-written by the resumed branch must carry that branch's history, not the abandoned one's.

    The resumed run saves checkpoint-15 again (``Trainer`` writes into the existing folder); a later resume from
    it must restore the new branch's step 15, so the sidecar's step-15 file must be the new one.
    """
    out = past_checkpoint["out"]
    side15 = step_path(out / "checkpoint-15" / STORE_DIR, 15)
    new15 = pd.read_parquet(step_path(store_dir(out), 15))
    assert (new15.relinf != -1.0).all()
    pd.testing.assert_frame_equal(pd.read_parquet(side15), new15)


def test_resume_in_fresh_output_dir_restores_history_from_sidecar(uninterrupted, tmp_path):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copytree(uninterrupted["out"] / "checkpoint-10", fresh / "checkpoint-10")
    assert list_steps(fresh / "checkpoint-10" / STORE_DIR) == [5, 10]
    trainer, _ = make_trainer(fresh, **RESUME_CONFIG)
    trainer.train(resume_from_checkpoint=str(fresh / "checkpoint-10"))
    assert list_steps(store_dir(fresh)) == [5, 10, 15, 20]
    assert (store_dir(fresh) / "metrics.json").exists()
    assert_pairs_equal(load_pairs(fresh), load_pairs(uninterrupted["out"]))
    assert_params_equal(trainable_params(trainer.model), uninterrupted["params"])


# ------------------------------------------------------------------------------ gradient accumulation


def test_gradient_accumulation_scores_match_checkpoint_model(tmp_path):
    trainer, cb = make_trainer(tmp_path, max_steps=10, save_steps=5, gradient_accumulation_steps=2)
    trainer.train()
    assert trainer.state.global_step == 10
    pairs = load_pairs(tmp_path)
    assert sorted(pairs.step.unique().tolist()) == [5, 10]
    probes, evals = examples_of(cb)
    names = {s.name: s for s in (*cb.probe_sets, *cb.eval_sets)}
    for step in (5, 10):
        model = reload_checkpoint(tmp_path / f"checkpoint-{step}")
        result = engine_on(model).compute(probes, evals)
        # Rebuild the expected matrix in the store's row order from the ids.
        p_index = {(s.name, i): k for k, (s, i) in enumerate((s, i) for s in cb.probe_sets for i in s.ids)}
        e_index = {(s.name, i): k for k, (s, i) in enumerate((s, i) for s in cb.eval_sets for i in s.ids)}
        at = pairs[pairs.step == step]
        rows = torch.tensor([p_index[(p, i)] for p, i in zip(at.probe_set, at.probe_id, strict=True)])
        cols = torch.tensor([e_index[(e, i)] for e, i in zip(at.eval_set, at.eval_id, strict=True)])
        assert len(at) == sum(len(s) for s in cb.probe_sets) * sum(len(s) for s in cb.eval_sets)
        assert set(at.probe_set) | set(at.eval_set) == set(names)
        assert_close_rel(at["dot"].to_numpy(), result.dot[rows, cols], 1e-6, f"dot@{step}")
        assert_close_rel(at.eval_sq_norm.to_numpy(), result.eval_sq_norm[cols], 1e-6, f"eval_sq_norm@{step}")
        assert_close_rel(at.probe_sq_norm.to_numpy(), result.probe_sq_norm[rows], 1e-6, f"probe_sq_norm@{step}")
        assert_close_rel(at.probe_loss.to_numpy(), result.probe_loss[rows], 1e-6, f"probe_loss@{step}")
        assert_close_rel(at.relinf.to_numpy(), result.dot[rows, cols] / result.eval_sq_norm[cols], 1e-6, "relinf")
    # The scores changed between the two checkpoints (the model did train).
    s = load_scores(tmp_path)
    assert not torch.allclose(
        torch.tensor(s[s.step == 5].s_in.to_numpy()), torch.tensor(s[s.step == 10].s_in.to_numpy()), rtol=1e-9
    )


# ------------------------------------------------------------------------------------------ TensorBoard


def test_metrics_reach_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    out = tmp_path / "out"
    trainer, _ = make_trainer(out, max_steps=10, save_steps=5, report_to=["tensorboard"])
    trainer.train()
    events = list(logdir.rglob("events.out.tfevents.*"))
    assert events, f"no event file under {logdir}"
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    swift = [t for t in tags if t.startswith("train/swift/")]
    assert swift, tags
    scores = load_scores(out)
    checked = 0
    for _, row in scores.iterrows():
        for ctx in ("in", "cross"):
            tag = f"train/swift/s_{ctx}/{row.probe_set}→{row.eval_set}"
            assert tag in tags, (tag, swift)
            values = {e.step: e.value for e in acc.Scalars(tag)}
            assert values[int(row.step)] == pytest.approx(row[f"s_{ctx}"], rel=1e-6)
            checked += 1
    assert checked == 2 * 2 * 2  # 2 steps x 2 probe sets x (s_in, s_cross)
    assert "train/loss" in tags
