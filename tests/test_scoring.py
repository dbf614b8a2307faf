"""Post-hoc scoring (``swift_callbacks.scoring``) of runs trained without the callback: the paper's original
workflow. A run trained with ``--no-influence`` and scored afterwards must have the history an identical run with
the callback recorded inline (training is bit-identical with and without it), for LoRA adapters and for full
fine-tuning checkpoints.
"""

from __future__ import annotations

import os
import shutil
import time

import pandas as pd
import pytest
import yaml
from helpers import torch_threads
from recipe_runs import assert_same_history, recipe, train_in_process

from swift_callbacks import load_metrics, load_pairs
from swift_callbacks.scoring import list_checkpoints, score_run
from swift_callbacks.scoring import main as score_main
from swift_callbacks.store import STORE_DIR, list_steps, store_dir
from swift_callbacks.training import ConfigError, load_config

pytestmark = pytest.mark.slow
CHECKPOINT_STEPS = [2, 4]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def clarify_runs(tmp_path_factory):
    """The clarification tiny recipe (LoRA) trained twice: with the callback, and without it."""
    base = tmp_path_factory.mktemp("clarify")
    train_in_process("clarify", base / "inline")
    train_in_process("clarify", base / "plain", influence=False)
    return base / "inline", base / "plain"


def test_run_without_callback_has_no_history(clarify_runs):
    _, plain = clarify_runs
    assert not store_dir(plain).exists()
    assert [s for s, _ in list_checkpoints(plain)] == CHECKPOINT_STEPS
    assert not (plain / "checkpoint-2" / STORE_DIR).exists()


def test_scoring_a_plain_run_gives_the_inline_history(clarify_runs):
    inline, plain = clarify_runs
    assert score_run(plain, recipe("clarify")) == CHECKPOINT_STEPS
    expected = load_pairs(inline)
    assert_same_history(load_pairs(plain), expected[expected.step.isin(CHECKPOINT_STEPS)], rtol=1e-5)
    assert set(load_metrics(plain).metric) == set(load_metrics(inline).metric)
    # Like the callback, scoring leaves a resume sidecar in each checkpoint it scored.
    assert list_steps(plain / "checkpoint-2" / STORE_DIR) == [2]
    assert list_steps(plain / "checkpoint-4" / STORE_DIR) == CHECKPOINT_STEPS
    # Scoring again finds nothing to do (the command line says so).
    assert score_run(plain, recipe("clarify")) == []


def test_score_command(clarify_runs, capsys):
    _, plain = clarify_runs
    for _ in range(2):  # config: the run's own swift_train_config.yaml; the second call finds step 2 recorded
        assert score_main(["--run", str(plain), "--steps", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("nothing to score")
    assert score_main(["--run", str(plain), "--set", "influence.engine.rout=ghost"]) == 2
    assert "influence.engine.rout: unknown key; did you mean 'route'?" in capsys.readouterr().err


def test_full_finetuning_checkpoints(tmp_path):
    """Without a lora section the checkpoints hold full weights, loaded with AutoModelForCausalLM."""
    full = ["lora=null", "training.learning_rate=1e-4"]
    train_in_process("evaluation", tmp_path / "inline", *full)
    trainer = train_in_process("evaluation", tmp_path / "plain", *full, influence=False)
    assert not hasattr(trainer.model, "peft_config")
    assert not (tmp_path / "plain" / "checkpoint-2" / "adapter_config.json").exists()
    config = load_config(recipe("evaluation"), [f"training.output_dir={tmp_path / 'plain'}", *full])
    assert score_run(tmp_path / "plain", config) == CHECKPOINT_STEPS
    expected = load_pairs(tmp_path / "inline")
    assert_same_history(load_pairs(tmp_path / "plain"), expected[expected.step.isin(CHECKPOINT_STEPS)], rtol=1e-5)


def test_scoring_errors(clarify_runs, tmp_path):
    _, plain = clarify_runs
    no_influence = yaml.safe_load(recipe("clarify").read_text(encoding="utf-8"))
    del no_influence["influence"]
    path = tmp_path / "no-influence.yaml"
    path.write_text(yaml.safe_dump(no_influence), encoding="utf-8")
    with pytest.raises(ConfigError, match="influence: the config has no influence section"):
        score_run(plain, path)
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        score_run(tmp_path, recipe("clarify"))
    with pytest.raises(FileNotFoundError, match="of the requested steps"):
        score_run(plain, recipe("clarify"), steps=[3])
    with pytest.raises(ConfigError, match=r"has no swift_train_config\.yaml"):
        (tmp_path / "checkpoint-1").mkdir()
        score_run(tmp_path)


def test_model_from_a_local_folder(tmp_path):
    """The Hub code path (AutoTokenizer / AutoModelForCausalLM.from_pretrained) on a saved tiny model folder."""
    from swift_callbacks.assets.tiny import build_demo_assets

    build_demo_assets(tmp_path / "model", hidden_size=64, num_layers=2, seed=0)
    model = [f"model.name_or_path={tmp_path / 'model'}", "model.dtype=float32"]
    train_in_process("cot", tmp_path / "run", *model)
    config = load_config(recipe("cot"), [f"training.output_dir={tmp_path / 'run'}", *model])
    assert score_run(tmp_path / "run", config, output_dir=tmp_path / "posthoc") == CHECKPOINT_STEPS
    expected = load_pairs(tmp_path / "run")
    assert_same_history(load_pairs(tmp_path / "posthoc"), expected[expected.step.isin(CHECKPOINT_STEPS)], rtol=1e-5)


def test_candidate_scores_are_the_inline_histories_means(clarify_runs, tmp_path):
    """Scoring the config's own probe set as candidates gives, per checkpoint and evaluation set, the mean over the
    evaluation examples of the RelInf (and cosine) the callback recorded inline for those probes; the ranking is
    their mean over checkpoints and sets."""
    import numpy as np

    from swift_callbacks.scoring import score_candidates

    inline, plain = clarify_runs
    candidates = recipe("clarify").parent / "data" / "z_clarify.jsonl"
    ranking = score_candidates(plain, candidates, recipe("clarify"), output_dir=tmp_path / "c", chunk_size=3,
                               progress=False)  # fmt: skip
    scores = pd.read_parquet(tmp_path / "c" / "scores.parquet")
    pairs = load_pairs(inline)
    pairs = pairs[(pairs.probe_set == "clarify") & pairs.step.isin(CHECKPOINT_STEPS)]
    expected = pairs.groupby(["step", "probe_id", "eval_set"])[["relinf", "cosine"]].mean().reset_index()
    got = scores.set_index(["step", "candidate_id", "eval_set"]).sort_index()
    want = expected.set_index(["step", "probe_id", "eval_set"]).sort_index()
    assert len(got) == len(want) == len(CHECKPOINT_STEPS) * 4 * 2  # 4 candidates, 2 evaluation sets
    assert np.isfinite(got[["mean_relinf", "mean_cosine"]].to_numpy()).all() and (got["n_scored"] > 0).all()
    np.testing.assert_allclose(got["mean_relinf"].to_numpy(), want["relinf"].to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(got["mean_cosine"].to_numpy(), want["cosine"].to_numpy(), rtol=1e-5)
    means = want.groupby(level="probe_id")["relinf"].mean().sort_values(ascending=False)
    assert list(ranking.candidate_id) == list(means.index) and list(ranking["rank"]) == [1, 2, 3, 4]
    np.testing.assert_allclose(ranking["mean_relinf"].to_numpy(), means.to_numpy(), rtol=1e-5)


def test_candidate_scoring_resumes_and_refuses_another_set_up(clarify_runs, tmp_path, capsys):
    _, plain = clarify_runs
    data = recipe("clarify").parent / "data"
    out = tmp_path / "c"
    argv = ["--run", str(plain), "--config", str(recipe("clarify")), "--candidates", str(data / "z_pos.jsonl"),
            "--output-dir", str(out), "--chunk-size", "2"]  # fmt: skip
    assert score_main(argv) == 0
    assert "ranked 4 candidates" in capsys.readouterr().out
    chunks = sorted((out / "step-4").glob("chunk-*"))
    assert [c.name for c in chunks] == ["chunk-000000.parquet", "chunk-000001.parquet"]
    kept = chunks[0].stat().st_mtime_ns
    first = pd.read_csv(out / "ranking.csv")
    chunks[1].unlink()  # as if killed before the last chunk of the last checkpoint
    assert score_main(argv) == 0
    assert chunks[0].stat().st_mtime_ns == kept and chunks[1].exists()  # only the missing chunk was computed
    pd.testing.assert_frame_equal(pd.read_csv(out / "ranking.csv"), first)
    capsys.readouterr()
    other = [*argv[:5], str(data / "z_clarify.jsonl"), *argv[6:]]
    assert score_main(other) == 2
    err = capsys.readouterr().err
    assert f"{out} holds candidate scores of another set-up (it differs in candidates)" in err
    assert score_main([*argv[:5], str(tmp_path / "missing.jsonl"), *argv[6:]]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_a_candidate_without_a_score_is_named_not_dropped(clarify_runs, tmp_path, monkeypatch, caplog):
    import logging
    import math

    from swift_callbacks.influence import InfluenceEngine
    from swift_callbacks.scoring import score_candidates

    real = InfluenceEngine.compute

    def compute(self, probes, evals, **kwargs):  # the first candidate's gradient is non-finite
        result = real(self, probes, evals, **kwargs)
        result.dot[0] = math.nan
        result.probe_sq_norm[0] = math.inf
        return result

    monkeypatch.setattr(InfluenceEngine, "compute", compute)
    _, plain = clarify_runs
    candidates = recipe("clarify").parent / "data" / "z_clarify.jsonl"
    with caplog.at_level(logging.WARNING, logger="swift_callbacks.scoring"):
        ranking = score_candidates(plain, candidates, recipe("clarify"), output_dir=tmp_path / "c", progress=False)
    assert len(ranking) == 4 and ranking["mean_relinf"].isna().tolist() == [False, False, False, True]
    first = pd.read_json(candidates, lines=True)["id"][0]
    assert f"1 candidates have no score (a non-finite gradient, or every evaluation gradient zero): ['{first}']" in (
        caplog.text
    )


def test_candidate_scores_are_tied_to_the_checkpoint_weights(clarify_runs, tmp_path, capsys):
    """A truncated chunk is computed again; scores of other weights (the folder trained again, another run's
    output) are refused, not reused."""
    _, plain = clarify_runs
    run = tmp_path / "run"
    shutil.copytree(plain, run, ignore=shutil.ignore_patterns(STORE_DIR))
    data = recipe("clarify").parent / "data"
    out = tmp_path / "c"
    argv = ["--run", str(run), "--config", str(recipe("clarify")), "--candidates", str(data / "z_pos.jsonl"),
            "--output-dir", str(out), "--chunk-size", "2"]  # fmt: skip
    assert score_main(argv) == 0
    first = pd.read_csv(out / "ranking.csv")
    chunk = out / "step-4" / "chunk-000001.parquet"
    chunk.write_bytes(chunk.read_bytes()[:200])  # killed mid-write by something that bypassed the atomic write
    assert score_main(argv) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "ranking.csv"), first)
    capsys.readouterr()
    weights = run / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes((run / "checkpoint-2" / "adapter_model.safetensors").read_bytes())  # other weights
    assert score_main(argv) == 2
    assert "holds scores of other weights" in capsys.readouterr().err


def test_a_history_older_than_its_checkpoint_is_refused(clarify_runs, tmp_path):
    """Training again into a scored folder (without the callback) leaves the old history; scoring says so."""
    _, plain = clarify_runs
    run = tmp_path / "run"
    shutil.copytree(plain, run, ignore=shutil.ignore_patterns(STORE_DIR))
    assert score_run(run, recipe("clarify"), steps=[2]) == [2]
    weights = run / "checkpoint-2" / "adapter_model.safetensors"
    later = time.time() + 60
    os.utime(weights, (later, later))  # as if written by a later training run
    with pytest.raises(ConfigError, match=r"is newer than the influence history's step 2.*`cp -a`"):
        score_run(run, recipe("clarify"))
