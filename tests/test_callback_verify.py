"""The callback verifies the engine when training starts, so a model it cannot track fails before any step."""

from __future__ import annotations

import pytest
from helpers import make_trainer, torch_threads

from swift_callbacks.influence import features
from swift_callbacks.influence.verify import VerificationError
from swift_callbacks.store import load_pairs


def test_a_wrong_reconstruction_stops_training_before_the_first_step(tmp_path, monkeypatch):
    original = features._materialize_call
    monkeypatch.setattr(features, "_materialize_call", lambda *a: {k: v * 1.01 for k, v in original(*a).items()})
    trainer, _ = make_trainer(tmp_path, callback_kwargs={"route": "materialize"})
    with torch_threads(), pytest.raises(VerificationError, match="No influence was stored"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert not (tmp_path / "checkpoint-10").exists()


def test_verified_run_records_every_save(tmp_path):
    trainer, callback = make_trainer(tmp_path, callback_kwargs={"verify": "every_save"})
    with torch_threads():
        trainer.train()
    assert sorted(load_pairs(tmp_path)["step"].unique()) == [10, 20]
    report = callback.engine.verification
    assert report is not None and report.complete and report.max_error["batch_sum"] <= report.tolerance
    assert callback.engine.sum_check_error <= 1e-4
