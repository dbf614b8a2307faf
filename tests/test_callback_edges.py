"""Edge cases of the callback's life cycle: re-training, interrupted saves, resuming elsewhere, misuse."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import StopAt, assert_close_rel, build_model, make_trainer, tokenizer, torch_threads
from transformers import Trainer, TrainingArguments

from swift_callbacks import HistoryError, InfluenceCallback, SetError, load_pairs
from swift_callbacks.influence.modules import UnsupportedModelError
from swift_callbacks.store import list_steps, store_dir


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def stopped_at_10(tmp_path_factory):
    out = tmp_path_factory.mktemp("edges") / "run"
    trainer, _ = make_trainer(out, extra_callbacks=[StopAt(10)], save_steps=5, max_steps=20, n_train=64)
    trainer.train()
    return out


def test_second_train_call_on_the_same_callback_recomputes_its_steps(tmp_path):
    trainer, _ = make_trainer(tmp_path, extra_callbacks=[StopAt(15)], save_steps=5, max_steps=20, n_train=64)
    trainer.train()
    trainer.callback_handler.callbacks = [c for c in trainer.callback_handler.callbacks if not isinstance(c, StopAt)]
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    assert list_steps(store_dir(tmp_path)) == [5, 10, 15, 20]


def test_interrupted_save_is_recorded_on_resume(stopped_at_10, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_at_10, run)
    reference = load_pairs(run)
    (store_dir(run) / "pairs" / "step-000000010.parquet").unlink()  # killed after checkpoint-10, before its record
    shutil.rmtree(run / "checkpoint-10" / "swift_influence")
    trainer, _ = make_trainer(run, save_steps=5, max_steps=20, n_train=64)
    trainer.train(resume_from_checkpoint=str(run / "checkpoint-10"))
    assert list_steps(store_dir(run)) == [5, 10, 15, 20]
    redone = load_pairs(run)
    assert_close_rel(redone[redone.step == 10]["dot"], reference[reference.step == 10]["dot"], 1e-6, "step 10")


def _tree(folder):
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_resume_from_a_checkpoint_outside_output_dir_restores_its_history(stopped_at_10, tmp_path):
    """The sidecar is read from the checkpoint train() resumed from, wherever it is; that folder is not touched."""
    before = _tree(stopped_at_10 / "checkpoint-10")
    trainer, _ = make_trainer(tmp_path / "elsewhere", save_steps=5, max_steps=20, n_train=64)
    trainer.train(resume_from_checkpoint=str(stopped_at_10 / "checkpoint-10"))
    assert list_steps(store_dir(tmp_path / "elsewhere")) == [5, 10, 15, 20]
    resumed, original = load_pairs(tmp_path / "elsewhere"), load_pairs(stopped_at_10)
    for step in (5, 10):
        assert_close_rel(resumed[resumed.step == step]["dot"], original[original.step == step]["dot"], 0, f"{step}")
    assert _tree(stopped_at_10 / "checkpoint-10") == before


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    """Run B: another model seed, stopped at step 10 (history 5, 10 and checkpoints 5, 10)."""
    out = tmp_path_factory.mktemp("other") / "run"
    trainer, _ = make_trainer(out, extra_callbacks=[StopAt(10)], save_steps=5, max_steps=20, n_train=64, model_seed=1)
    trainer.train()
    return out


def _dots(run, step):
    pairs = load_pairs(run)
    return torch.tensor(pairs[pairs.step == step]["dot"].to_numpy())


def test_resume_through_a_symlinked_output_dir(stopped_at_10, tmp_path):
    (tmp_path / "x" / "y" / "real").mkdir(parents=True)  # ".." through the link lands elsewhere than it reads
    (tmp_path / "link").symlink_to(tmp_path / "x" / "y" / "real")
    out = tmp_path / "link" / "a" / "run"
    trainer, _ = make_trainer(out, save_steps=5, max_steps=20, n_train=64)
    trainer.train(resume_from_checkpoint=str(stopped_at_10 / "checkpoint-10"))
    assert list_steps(store_dir(out)) == [5, 10, 15, 20]
    assert torch.equal(_dots(out, 5), _dots(stopped_at_10, 5))


def test_no_sidecar_outside_keeps_only_steps_the_checkpoint_logged(stopped_at_10, other_run, tmp_path):
    """A checkpoint without sidecar resumed into a folder holding another run: B's steps are not A's lineage."""
    a_ckpt = tmp_path / "a-checkpoint-10"
    shutil.copytree(stopped_at_10 / "checkpoint-10", a_ckpt)
    shutil.rmtree(a_ckpt / "swift_influence")
    run = tmp_path / "b"
    shutil.copytree(other_run, run)
    trainer, _ = make_trainer(run, save_steps=5, max_steps=20, n_train=64)
    trainer.train(resume_from_checkpoint=str(a_ckpt))
    assert list_steps(store_dir(run)) == [10, 15, 20]  # B's 5 and 10 moved aside, 10 recomputed from A's weights
    assert torch.allclose(_dots(run, 10), _dots(stopped_at_10, 10), rtol=1e-5)
    moved = sorted(p.name for p in (store_dir(run) / "superseded").rglob("step-*.parquet"))
    assert moved == ["step-000000005.parquet", "step-000000010.parquet"]
    # The same checkpoint with its own sidecar in place of a folder: refused, nothing changed.
    (a_ckpt / "swift_influence").write_text("not a folder")
    trainer, _ = make_trainer(tmp_path / "c", save_steps=5, max_steps=20, n_train=64)
    with pytest.raises(HistoryError, match="is not a folder"):
        trainer.train(resume_from_checkpoint=str(a_ckpt))


def test_resume_with_other_sets_says_the_history_holds_two_set_ups(stopped_at_10, tmp_path, caplog):
    import logging

    from helpers import eval_sets, probe_sets

    run = tmp_path / "run"
    shutil.copytree(stopped_at_10, run)
    fewer = {name: rows[:3] for name, rows in probe_sets().items()}
    trainer, _ = make_trainer(run, save_steps=5, max_steps=15, n_train=64,
                              callback_kwargs={"probe_sets": fewer, "eval_sets": eval_sets()})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="swift_callbacks.callback"):
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-10"))
    assert "differ from those of the restored steps" in caplog.text


def test_a_copied_trainer_is_refused_before_training_not_tracked_as_zeros(tmp_path):
    """A deep copy of a TRL trainer keeps a model forward bound to the original modules: tracking it would read
    every gradient as zero (an adversarial pass found exactly that). The callback fails before the first step."""
    import copy

    trainer, _ = make_trainer(tmp_path / "run", save_steps=5, max_steps=5, n_train=32)
    twin = copy.deepcopy(trainer)
    with pytest.raises(UnsupportedModelError, match="called none of the tracked modules"):
        twin.train()
    assert twin.state.global_step == 0


def test_resume_from_outside_ignores_another_runs_checkpoint_of_the_same_step(stopped_at_10, tmp_path):
    """output_dir holds another run's history and checkpoint-10: the history must become the resumed lineage's."""
    other = tmp_path / "other"
    trainer, _ = make_trainer(other, extra_callbacks=[StopAt(10)], save_steps=5, max_steps=20, n_train=64,
                              model_seed=1)  # fmt: skip
    trainer.train()
    theirs = load_pairs(other)
    trainer, _ = make_trainer(other, save_steps=5, max_steps=20, n_train=64)
    trainer.train(resume_from_checkpoint=str(stopped_at_10 / "checkpoint-10"))
    assert list_steps(store_dir(other)) == [5, 10, 15, 20]
    mine, original = load_pairs(other), load_pairs(stopped_at_10)
    for step in (5, 10):
        assert_close_rel(mine[mine.step == step]["dot"], original[original.step == step]["dot"], 0, f"{step}")
        assert not torch.allclose(
            torch.tensor(mine[mine.step == step]["dot"].to_numpy()),
            torch.tensor(theirs[theirs.step == step]["dot"].to_numpy()),
        )
    assert sorted(p.name for p in (store_dir(other) / "superseded").rglob("step-*.parquet")) == [
        "step-000000005.parquet", "step-000000010.parquet",
    ]  # fmt: skip


def test_resume_is_refused_when_the_resumed_checkpoint_cannot_be_told(stopped_at_10, tmp_path):
    """train() called past the wrapper (on the class) from outside output_dir: refused before the first step."""
    from swift_callbacks import HistoryError

    trainer, _ = make_trainer(tmp_path / "elsewhere", save_steps=5, max_steps=20, n_train=64)
    with pytest.raises(HistoryError, match="cannot tell which checkpoint"):
        type(trainer).train(trainer, resume_from_checkpoint=str(stopped_at_10 / "checkpoint-10"))
    assert not store_dir(tmp_path / "elsewhere").exists() or list_steps(store_dir(tmp_path / "elsewhere")) == []


def test_resume_past_the_wrapper_from_output_dir_is_accepted(stopped_at_10, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_at_10, run)
    trainer, _ = make_trainer(run, save_steps=5, max_steps=20, n_train=64)
    type(trainer).train(trainer, resume_from_checkpoint=str(run / "checkpoint-10"))
    assert list_steps(store_dir(run)) == [5, 10, 15, 20]


def test_resume_from_the_last_checkpoint(stopped_at_10, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_at_10, run)
    trainer, _ = make_trainer(run, save_steps=5, max_steps=20, n_train=64)
    trainer.train(resume_from_checkpoint=True)
    assert list_steps(store_dir(run)) == [5, 10, 15, 20]
    assert not (store_dir(run) / "superseded").exists() or not list((store_dir(run) / "superseded").rglob("*.parquet"))


def test_two_callbacks_on_one_trainer_fail_before_training(tmp_path):
    trainer, cb = make_trainer(tmp_path, max_steps=4, save_steps=2)
    trainer.add_callback(
        InfluenceCallback(trainer, probe_sets={"p2": cb.probe_sets[0].rows}, eval_sets={"e2": cb.eval_sets[0].rows})
    )
    with pytest.raises(ValueError, match="Two InfluenceCallbacks"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"input_ids": [5, 6, 7], "labels": [-100, 6]}, "'labels' has 2 entries but 'input_ids' has 3"),
        ({"input_ids": [5, 6, 10**6], "labels": [-100, 6, 7]}, r"token ids \[1000000\] are outside"),
        ({"input_ids": [5, -3, 7], "labels": [-100, 6, 7]}, r"token ids \[-3\] are outside"),
    ],
)
def test_bad_pretokenized_rows(tmp_path, row, match):
    trainer, _ = make_trainer(tmp_path, callback=False)
    with pytest.raises(SetError, match=rf"Set 'p', example 'bad': {match}"):
        InfluenceCallback(trainer, probe_sets={"p": [{"id": "bad", **row}]}, eval_sets={"e": [{"id": "x", **row}]})


def test_plain_trainer_without_a_tokenizer_trains(tmp_path):
    tok = tokenizer()
    ids = tok("What is 1 plus 1? 2")["input_ids"]
    rows = [{"id": "x", "input_ids": ids, "labels": [-100] * 6 + ids[6:]}]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2, save_steps=2)
    train = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)}] * 4
    trainer = Trainer(model=build_model(), args=args, train_dataset=train)
    trainer.add_callback(InfluenceCallback(trainer, probe_sets={"p": rows}, eval_sets={"e": rows}))
    trainer.train()
    assert list_steps(store_dir(tmp_path)) == [2]


def test_options_that_would_record_nothing_fail_at_construction(tmp_path):
    """A filter that tracks nothing, sets without a task in common, and a run that never saves are refused when the
    callback is built, in one line, before any training step."""
    from helpers import set_rows

    from swift_callbacks import ConfigError

    trainer, _ = make_trainer(tmp_path, callback=False)
    sets = {"probe_sets": {"p": set_rows("cot_study_z_cot", 4)}, "eval_sets": {"e": set_rows("cot_study_z_similar", 4)}}
    with pytest.raises(ConfigError, match=r"No trainable parameter matched.*whose name matches 'lora_Q'"):
        InfluenceCallback(trainer, **sets, param_filter="lora_Q")
    with pytest.raises(ConfigError, match=r"route: must be one of"):
        InfluenceCallback(trainer, **sets, route="gost")
    other = [{**r, "task": "elsewhere"} for r in set_rows("cot_study_z_similar", 4)]
    with pytest.raises(SetError, match=r"No probe example shares a task with any evaluation example"):
        InfluenceCallback(trainer, probe_sets=sets["probe_sets"], eval_sets={"e": other})
    never, _ = make_trainer(tmp_path / "never", callback=False, save_strategy="no")
    with pytest.raises(ConfigError, match=r"save_strategy='no' saves none"):
        InfluenceCallback(never, **sets)
    InfluenceCallback(never, **sets, every_n_steps=5)  # a schedule of its own is fine
