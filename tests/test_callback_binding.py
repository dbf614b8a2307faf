"""The callback constructed before its trainer (``SFTTrainer(callbacks=[...])``), and its progress bar."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    build_model,
    engine_examples,
    engine_on,
    eval_sets,
    make_trainer,
    probe_sets,
    torch_threads,
)

from swift_callbacks import ConfigError, InfluenceCallback, load_pairs
from swift_callbacks.sets import SetError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _sft(out, callbacks=None, **overrides):
    """A 2-step LoRA SFTTrainer on 16 rows, the given callbacks passed to its constructor."""
    overrides = {"max_steps": 2, "save_steps": 2, **overrides}
    return make_trainer(out, callback=False, callbacks=callbacks, n_train=16, lora_dropout=0.0, **overrides)[0]


def _sets():
    return {"probe_sets": probe_sets(3), "eval_sets": eval_sets(3)}


def test_callback_in_the_constructor_records_what_add_callback_records(tmp_path):
    """Passed unbound in ``callbacks=[...]``, the callback binds itself while the trainer is built and records
    exactly the pairs of the callback given the trainer."""
    early = InfluenceCallback(**_sets())
    assert early.trainer is None
    trainer = _sft(tmp_path / "early", callbacks=[early])
    assert early.trainer is trainer
    trainer.train()

    late_trainer = _sft(tmp_path / "late")
    late_trainer.add_callback(InfluenceCallback(late_trainer, **_sets()))
    late_trainer.train()

    a, b = load_pairs(tmp_path / "early"), load_pairs(tmp_path / "late")
    assert len(a) == len(b) == 2 * 3 * 3
    torch.testing.assert_close(torch.tensor(a["dot"].to_numpy()), torch.tensor(b["dot"].to_numpy()), rtol=0, atol=0)


def test_unbound_callback_added_later_binds_at_train(tmp_path):
    trainer = _sft(tmp_path)
    cb = InfluenceCallback(**_sets())
    trainer.add_callback(cb)
    trainer.train()
    assert cb.trainer is trainer
    assert sorted(load_pairs(tmp_path)["step"].unique()) == [2]


def test_trainer_checks_run_when_the_trainer_is_built(tmp_path):
    """Options that depend on the trainer fail where it is constructed, before any step."""
    with pytest.raises(ConfigError, match=r"save_strategy='no' saves none"):
        _sft(tmp_path, callbacks=[InfluenceCallback(**_sets())], save_strategy="no")
    with pytest.raises(ConfigError, match=r"No trainable parameter matched"):
        _sft(tmp_path, callbacks=[InfluenceCallback(**_sets(), param_filter="nowhere")])


def test_a_callback_whose_trainer_never_trained_moves_to_the_next_trainer(tmp_path):
    """A trainer built again (a notebook cell run twice), or one whose construction failed after binding, does not
    strand the callback; the trainer that trains is the one tracked, and its history holds its checkpoints."""
    cb = InfluenceCallback(**_sets())
    first = _sft(tmp_path / "a", callbacks=[cb])
    assert cb.trainer is first
    second = _sft(tmp_path / "b", callbacks=[cb])
    assert cb.trainer is second
    first.train()  # the first trainer trains after all: the callback follows the trainer whose events it gets
    assert cb.trainer is first
    assert sorted(load_pairs(tmp_path / "a")["step"].unique()) == [2]
    with pytest.raises(ConfigError, match=r"which has trained with it"):
        second.train()


def test_a_failed_move_to_another_trainer_leaves_the_sets_of_the_first(tmp_path):
    """A second trainer that cannot prepare the sets (its max_length leaves a set without completion tokens) fails
    before binding; the first trainer, trained next, tokenizes the sets its own way again, and its history equals
    that of a callback that never met the second trainer."""

    def sets():
        long = [dict(r, id=r["id"] + "L", prompt=r["prompt"] + " filler words here" * 8) for r in probe_sets(3)["z"]]
        return {"probe_sets": {"short": probe_sets(3)["z"], "long": long}, "eval_sets": eval_sets(3)}

    cb = InfluenceCallback(**sets())
    first = _sft(tmp_path / "a", callbacks=[cb])
    with pytest.raises(SetError, match=r"Set 'long'"):
        _sft(tmp_path / "b", callbacks=[cb], max_length=9)
    assert cb.trainer is None
    first.train()
    fresh = _sft(tmp_path / "fresh", callbacks=[InfluenceCallback(**sets())])
    fresh.train()
    got, want = load_pairs(tmp_path / "a"), load_pairs(tmp_path / "fresh")
    assert len(got) == len(want) > 0
    assert got["dot"].tolist() == pytest.approx(want["dot"].tolist(), rel=1e-6)


def test_a_refused_train_does_not_make_the_binding_final(tmp_path):
    """train() refused before any step (two callbacks would write one history) leaves the callback free to move to
    a corrected trainer."""
    cb = InfluenceCallback(**_sets())
    wrong = _sft(tmp_path / "a", callbacks=[cb, InfluenceCallback(**_sets())])
    with pytest.raises(Exception, match=r"Two InfluenceCallbacks would write the same influence history"):
        wrong.train()
    right = _sft(tmp_path / "b", callbacks=[cb])
    assert cb.trainer is right
    right.train()
    assert sorted(load_pairs(tmp_path / "b")["step"].unique()) == [2]


def test_misuse_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"first argument is the trainer .*got dict: pass the sets by keyword"):
        InfluenceCallback(probe_sets(3), eval_sets(3))
    cb = InfluenceCallback(**_sets())
    _sft(tmp_path / "a", callbacks=[cb]).train()
    with pytest.raises(ConfigError, match=r"already bound to another trainer, which has trained with it; construct"):
        _sft(tmp_path / "b", callbacks=[cb])
    loose = InfluenceCallback(**_sets())
    with pytest.raises(ConfigError, match=r"could not find it during train\(\).*callback.bind\(trainer\)"):
        loose.on_train_begin(None, None, None)


def test_engine_reports_progress_to_the_last_example():
    """``progress(done, total)`` ends at total = held + streamed x held chunks (here the evaluation examples are
    held), never past it."""
    probes, evals = engine_examples()
    engine = engine_on(build_model(0), micro_batch_size=2)
    seen: list[tuple[int, int]] = []
    engine.compute(probes, evals, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(probes) + len(evals), len(probes) + len(evals))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    engine.route = "materialize"  # (auto would move blocks to the ghost route to fit one chunk)
    engine.max_feature_bytes = sum(b.numel for b in engine.blocks) * 4 * 2  # 2 materialized evals per chunk
    seen.clear()
    engine.compute(probes, evals, progress=lambda done, total: seen.append((done, total)))
    chunks = -(-len(evals) // 2)
    assert seen[-1] == (len(evals) + chunks * len(probes),) * 2


def test_progress_bar_during_the_save(tmp_path, capsys):
    trainer = _sft(tmp_path, callbacks=[InfluenceCallback(**_sets())], disable_tqdm=False)
    trainer.train()
    assert "swift influence (step 2)" in capsys.readouterr().err
    quiet = _sft(tmp_path / "quiet", callbacks=[InfluenceCallback(**_sets())], disable_tqdm=True)
    quiet.train()
    assert "swift influence" not in capsys.readouterr().err


def test_a_trainer_subclass_whose_train_names_its_parameters_otherwise(tmp_path):
    """The resume watcher passes the call on as made: a subclass's ``train(resume=...)`` keeps working."""
    from trl import SFTTrainer

    class Renamed(SFTTrainer):
        def train(self, resume=None, **kwargs):
            return super().train(resume_from_checkpoint=resume, **kwargs)

    cb = InfluenceCallback(**_sets())
    trainer = _sft(tmp_path, callbacks=[cb])
    trainer.__class__ = Renamed  # the same trainer, seen through the subclass
    trainer.train(resume=None)
    assert sorted(load_pairs(tmp_path)["step"].unique()) == [2]


@pytest.mark.parametrize(("option", "value"), [("strict", "false"), ("every_n_steps", 1.5), ("at_step_zero", 1)])
def test_options_of_the_wrong_type_are_one_clear_line(option, value):
    with pytest.raises(ConfigError, match=option):
        InfluenceCallback(**_sets(), **{option: value})
