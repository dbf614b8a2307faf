"""Faults around real SFTTrainer runs: SIGKILL while the history is written, snapshotted or restored, a full disk,
zero / non-finite gradients, two trainings on one output_dir, resumes from another branch.

By default a fault is recorded (``failures.jsonl``, a warning, ``swift/failed``) and training goes on;
``strict=True`` raises.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import make_trainer, torch_threads
from test_training_integration import assert_pairs_equal
from train_kill_worker import KILL_CONFIG

from swift_callbacks import InfluenceEngine, SetError, load_failures, load_pairs, load_scores
from swift_callbacks import store as store_mod
from swift_callbacks.store import LOCK, STORE_DIR, HistoryLockedError, list_steps, step_path, store_dir

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of ``KILL_CONFIG``."""
    out = tmp_path_factory.mktemp("reference")
    trainer, _ = make_trainer(out, **KILL_CONFIG)
    trainer.train()
    assert list_steps(store_dir(out)) == [5, 10, 15]
    return out


def swift_logs(trainer) -> dict[int, dict]:
    return {r["step"]: r for r in trainer.state.log_history if "swift/seconds" in r}


def leftovers(out: Path) -> list[str]:
    return [p.relative_to(out).as_posix() for p in out.rglob("*") if ".swift-" in p.name]


# ------------------------------------------------------------------------------------------------ SIGKILL


@pytest.mark.parametrize(
    ("method", "k"),
    [
        ("write_step", 3),  # step 10's file half made: only a stray temporary file
        ("write_step", 8),  # the manifest records step 10 as pending, its file not renamed yet
        ("write_step", 12),  # renamed, not committed
        ("snapshot", 14),  # checkpoint-10's sidecar complete in its temporary folder, not renamed
        ("resume", 9),  # a resume from checkpoint-10 half done
    ],
)
def test_sigkill_while_writing_then_resume(reference, tmp_path, caplog, method, k):
    out = tmp_path / "run"
    resume = []
    if method == "resume":  # a finished run, resumed from checkpoint-10 and killed while restoring the history
        trainer, _ = make_trainer(out, **KILL_CONFIG)
        trainer.train()
        resume = [str(out / "checkpoint-10")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, HERE / "train_kill_worker.py", out, method, "10", str(k), *resume],
        capture_output=True, text=True, timeout=600, env=env, cwd=HERE,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert (store_dir(out) / LOCK).exists()  # left behind by the killed run
    # Readers see a complete history: steps of the uninterrupted run, identical, nothing partial.
    seen = load_pairs(out)
    assert set(seen.step.unique()) <= {5, 10, 15}
    expected = load_pairs(reference)
    assert_pairs_equal(seen, expected[expected.step.isin(seen.step.unique())])
    trainer, _ = make_trainer(out, **KILL_CONFIG)
    with caplog.at_level(logging.WARNING, logger="swift_callbacks"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-10"))
    assert "Taking over the influence history lock" in caplog.text
    assert list_steps(store_dir(out)) == [5, 10, 15]
    assert_pairs_equal(load_pairs(out), expected)
    for step in (10, 15):
        side = out / f"checkpoint-{step}" / STORE_DIR
        assert store_mod._sidecar_view(side, step).steps() == [s for s in (5, 10, 15) if s <= step]
        for s in (5, 10, 15):
            if s <= step:
                assert step_path(side, s).read_bytes() == step_path(store_dir(out), s).read_bytes()
    assert load_failures(out).empty
    assert not leftovers(out)
    assert not (store_dir(out) / LOCK).exists()


# ------------------------------------------------------------------------------------------------ full disk


def disk_full_for(monkeypatch, match) -> None:
    real = store_mod._write_new

    def write(path, data):
        if match(Path(path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(store_mod, "_write_new", write)


def is_live_step_10(path: Path) -> bool:
    return "step-000000010.parquet" in path.name and path.parent.parent.name == STORE_DIR


def test_full_disk_is_recorded_and_training_completes(reference, tmp_path, monkeypatch, caplog):
    disk_full_for(monkeypatch, is_live_step_10)
    trainer, _ = make_trainer(tmp_path, **KILL_CONFIG)
    with caplog.at_level(logging.WARNING, logger="swift_callbacks.callback"):
        trainer.train()
    assert trainer.state.global_step == 15
    assert "could not write step 10 to the history" in caplog.text
    assert list_steps(store_dir(tmp_path)) == [5, 15]
    (failure,) = load_failures(tmp_path).to_dict("records")
    assert (failure["step"], failure["kind"], failure["stored"]) == (10, "write_step", False)
    assert "No space left on device" in failure["reason"]
    assert {s: r["swift/failed"] for s, r in swift_logs(trainer).items()} == {5: 0, 10: 1, 15: 0}
    assert list_steps(tmp_path / "checkpoint-10" / STORE_DIR) == [5]
    assert not leftovers(tmp_path)
    # Disk space back: resuming from checkpoint-10 computes the missing step; the failure stays on record.
    monkeypatch.undo()
    trainer, _ = make_trainer(tmp_path, **KILL_CONFIG)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    assert_pairs_equal(load_pairs(tmp_path), load_pairs(reference))
    assert list(load_failures(tmp_path).step) == [10]


def test_full_disk_while_snapshotting_leaves_no_sidecar(tmp_path, monkeypatch):
    def in_sidecar_10(path: Path) -> bool:  # a file of checkpoint-10's sidecar, in its temporary folder
        return path.parent.parent.name.startswith(f".{STORE_DIR}.") and path.parents[2].name == "checkpoint-10"

    disk_full_for(monkeypatch, lambda p: in_sidecar_10(p) and "10" in p.name)
    trainer, _ = make_trainer(tmp_path, **KILL_CONFIG)
    trainer.train()
    assert list_steps(store_dir(tmp_path)) == [5, 10, 15]
    assert not (tmp_path / "checkpoint-10" / STORE_DIR).exists()
    assert list_steps(tmp_path / "checkpoint-15" / STORE_DIR) == [5, 10, 15]
    (failure,) = load_failures(tmp_path).to_dict("records")
    assert (failure["step"], failure["kind"]) == (10, "snapshot")
    assert "could not write the sidecar of" in failure["reason"]
    assert not leftovers(tmp_path)


def test_full_disk_with_strict_raises(tmp_path, monkeypatch):
    disk_full_for(monkeypatch, is_live_step_10)
    trainer, _ = make_trainer(tmp_path, callback_kwargs={"strict": True}, **KILL_CONFIG)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.train()
    assert trainer.state.global_step == 10
    assert list_steps(store_dir(tmp_path)) == [5]


# ------------------------------------------------------------------------------------ undefined RelInf


def broken_gradients(monkeypatch, eval_index: int, probe_index: int) -> None:
    """The engine reports a zero gradient for one evaluation example and a non-finite one for one probe."""
    real = InfluenceEngine.compute

    def compute(self, probes, evals, **kwargs):
        result = real(self, probes, evals, **kwargs)
        result.eval_sq_norm[eval_index] = 0.0
        result.dot[:, eval_index] = 0.0
        result.probe_sq_norm[probe_index] = math.inf
        return result

    monkeypatch.setattr(InfluenceEngine, "compute", compute)


def test_undefined_relinf_is_recorded_and_left_out_of_the_scores(tmp_path, monkeypatch, caplog):
    broken_gradients(monkeypatch, eval_index=1, probe_index=2)
    trainer, cb = make_trainer(tmp_path, max_steps=10, save_steps=5)
    with caplog.at_level(logging.WARNING, logger="swift_callbacks.callback"):
        trainer.train()
    assert trainer.state.global_step == 10
    bad_eval = cb.eval_sets[0].ids[1]
    bad_probe = (cb.probe_sets[0].name, cb.probe_sets[0].ids[2])
    assert f"evaluation examples [{bad_eval!r}] have a zero (or non-finite) gradient norm" in caplog.text
    failures = load_failures(tmp_path)
    assert [(r.step, r.kind, r.set, r.ids, r.stored) for r in failures.itertuples()] == [
        (step, kind, name, ids, True)
        for step in (5, 10)
        for kind, name, ids in (("eval_norm", cb.eval_sets[0].name, [bad_eval]),
                                ("probe_norm", bad_probe[0], [bad_probe[1]]))
    ]  # fmt: skip
    pairs = load_pairs(tmp_path)
    undefined = (pairs.eval_id == bad_eval) | ((pairs.probe_set == bad_probe[0]) & (pairs.probe_id == bad_probe[1]))
    assert pairs.relinf[undefined].isna().all() and pairs.cosine[undefined].isna().all()
    assert np.isfinite(pairs.relinf[~undefined]).all()
    scores = load_scores(tmp_path)
    logs = swift_logs(trainer)
    for row in scores.itertuples():
        block = pairs[(pairs.step == row.step) & (pairs.probe_set == row.probe_set) & (pairs.eval_set == row.eval_set)]
        scored = block[np.isfinite(block.relinf)]
        assert (row.n_in, row.n_cross) == (int(scored.paired.sum()), int((~scored.paired).sum()))
        assert row.n_in + row.n_cross < len(block)
        assert row.s_in == pytest.approx(scored.relinf[scored.paired].mean(), rel=1e-12)
        assert logs[row.step][f"swift/s_in/{row.probe_set}→{row.eval_set}"] == pytest.approx(row.s_in, rel=1e-12)
    assert {s: r["swift/failed"] for s, r in logs.items()} == {5: 2, 10: 2}


def test_undefined_relinf_with_strict_raises(tmp_path, monkeypatch):
    broken_gradients(monkeypatch, eval_index=0, probe_index=0)
    trainer, _ = make_trainer(tmp_path, max_steps=10, save_steps=5, callback_kwargs={"strict": True})
    with pytest.raises(SetError, match=r"evaluation examples .* have a zero \(or non-finite\) gradient norm"):
        trainer.train()
    assert trainer.state.global_step == 5
    assert list_steps(store_dir(tmp_path)) == []
    assert set(load_failures(tmp_path).kind) == {"eval_norm", "probe_norm"}


# ----------------------------------------------------------------------------------------------- two writers


def test_a_second_training_on_the_same_output_dir_is_refused(tmp_path):
    first, cb = make_trainer(tmp_path, max_steps=4, save_steps=2)
    cb.on_train_begin(first.args, first.state, first.control)  # the first training has started
    second, _ = make_trainer(tmp_path, max_steps=4, save_steps=2)
    with pytest.raises(HistoryLockedError, match="Another training in this process is writing the influence"):
        second.train()
    assert second.state.global_step == 0
    cb.on_train_end(first.args, first.state, first.control)
    second.train()
    assert list_steps(store_dir(tmp_path)) == [2, 4]
    assert not (store_dir(tmp_path) / LOCK).exists()


# --------------------------------------------------------------------------------------- another branch

BRANCH = {"save_steps": 10, "max_steps": 30, "n_train": 64}


def test_resumes_from_another_branch_keep_exactly_the_right_steps(tmp_path, caplog):
    """Branch A trains to 30; B and then C resume from checkpoint-10 with other data orders."""
    root = store_dir(tmp_path)
    runs = {}
    for name, seed in (("A", 0), ("B", 1), ("C", 2)):
        trainer, _ = make_trainer(tmp_path, data_seed=seed, **BRANCH)
        with caplog.at_level(logging.WARNING, logger="swift_callbacks.callback"):
            trainer.train(resume_from_checkpoint=None if name == "A" else str(tmp_path / "checkpoint-10"))
        assert list_steps(root) == [10, 20, 30]
        runs[name] = {s: step_path(root, s).read_bytes() for s in (10, 20, 30)}
        for ckpt in (10, 20, 30):  # every sidecar is the live lineage up to its step, verified
            side = tmp_path / f"checkpoint-{ckpt}" / STORE_DIR
            view = store_mod._sidecar_view(side, ckpt)
            assert {s: step_path(side, s).read_bytes() for s in view.steps()} == {
                s: b for s, b in runs[name].items() if s <= ckpt
            }
    assert runs["A"][10] == runs["B"][10] == runs["C"][10]
    assert len({runs[n][20] for n in "ABC"}) == len({runs[n][30] for n in "ABC"}) == 3  # three branches
    aside = {p.name: {f.name: f.read_bytes() for f in p.iterdir()} for p in (root / "superseded").iterdir()}
    name = "step-0000000{}.parquet".format
    assert aside == {
        "resumed-at-10": {name(20): runs["A"][20], name(30): runs["A"][30]},
        "resumed-at-10-2": {name(20): runs["B"][20], name(30): runs["B"][30]},
    }
    assert "influence steps [20, 30] of another branch moved to" in caplog.text
    c = load_pairs(tmp_path)
    assert sorted(c.step.unique()) == [10, 20, 30]
    assert_pairs_equal(c[c.step == 30], pd.read_parquet(root / "pairs" / name(30)))


# ------------------------------------------------------------------------------------------------- options


def test_engine_options_reach_the_engine_and_bad_ones_fail_at_once(tmp_path):
    _, cb = make_trainer(
        tmp_path, callback_kwargs={"verify": "every_save", "precision": "fp32", "strict": True}, max_steps=2
    )
    assert (cb.engine.verify, cb.engine.precision, cb.strict) == ("every_save", "fp32", True)
    _, default = make_trainer(tmp_path / "default", max_steps=2)
    assert (default.engine.verify, default.engine.precision, default.strict) == (True, "auto", False)
    for bad in ({"verify": "sometimes"}, {"precision": "bf16"}, {"route": "fast"}, {"micro_batch_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_trainer(tmp_path / "bad", callback_kwargs=bad, max_steps=2)
