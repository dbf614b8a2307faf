"""The validation study: variants, their training data and order (checked on the real dataloader), the calls and
their agreement, and a tiny study end to end (train, evaluate, Table 2, agreement; a rerun trains nothing)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from swift_callbacks.cli import main as cli_main
from swift_callbacks.configuration import ConfigError, read_yaml
from swift_callbacks.validation import (
    agreement,
    load_validation_config,
    measured_call,
    parse_variant,
    plan,
    run_recipe,
    run_validation,
    swift_call,
    validation_config,
)
from swift_callbacks.validation import study as study_module

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "cot" / "validate_tiny_cpu.yaml"


def _data(tmp_path, **changes) -> dict:
    data = read_yaml(RECIPE.read_text(encoding="utf-8"))
    data["output_dir"] = str(tmp_path / "study")
    for key, value in changes.items():
        data[key] = value
    return data


@pytest.mark.parametrize(
    "text, mixed, after",
    [("base", (), ()), ("base+cot", ("cot",), ()), ("base->cot", (), ("cot",)),
     ("base + cot + ev", ("cot", "ev"), ()), ("base->cot+ev", (), ("cot", "ev"))],
)  # fmt: skip
def test_variants_parse(text, mixed, after):
    variant = parse_variant(text, ["cot", "ev"], "variants[0]")
    assert (variant.mixed, variant.after) == (mixed, after)
    assert "/" not in variant.slug and ">" not in variant.slug


@pytest.mark.parametrize(
    "text, message",
    [("cot+base", "is not base, base\\+X or base->X"), ("base->", "is not base"), ("base+cott", "did you mean 'cot'"),
     ("base+cot+cot", "names a strategy twice")],
)  # fmt: skip
def test_bad_variants_are_named(text, message):
    with pytest.raises(ConfigError, match=rf"variants\[0\]: .*{message}"):
        parse_variant(text, ["cot", "ev"], "variants[0]")


def test_recipes_of_the_variants(tmp_path):
    config = validation_config(_data(tmp_path, seeds=[0, 3]))
    runs = plan(config)
    assert [(r.variant.name, r.seed, r.influence) for r in runs] == [
        ("base", 0, True), ("base", 3, False), ("base+cot", 0, False), ("base+cot", 3, False),
        ("base->cot", 0, False), ("base->cot", 3, False)]  # fmt: skip
    base = run_recipe(config, runs[1])
    assert "influence" not in base and base["training"]["seed"] == 3 and base["data"]["seed"] == 3
    assert "influence" in run_recipe(config, runs[0])
    mixed = run_recipe(config, runs[2])
    paths = [s["path"] if isinstance(s, dict) else s for s in mixed["data"]["train"]]
    assert paths == ["demo:base", "demo:cot_study_z_cot"]
    ordered = run_recipe(config, runs[4])
    assert ordered["training"]["train_sampling_strategy"] == "sequential"
    assert ordered["training"]["num_train_epochs"] == 1 and ordered["data"]["shuffle"] is False


def test_base_then_x_is_base_first_then_x_in_every_epoch_on_the_real_dataloader(tmp_path):
    from swift_callbacks.assets.tiny import load_rows
    from swift_callbacks.training.config import config_from_dict
    from swift_callbacks.training.train import build_trainer

    data = _data(tmp_path)
    data["recipe"]["training"]["num_train_epochs"] = 2
    config = validation_config(data)
    run = next(r for r in plan(config) if r.variant.name == "base->cot")
    recipe = run_recipe(config, run)
    trainer, _ = build_trainer(config_from_dict(recipe), influence=False)
    tok = trainer.processing_class
    seen = [tok.decode(ids[ids != tok.pad_token_id]) for batch in trainer.get_train_dataloader()
            for ids in batch["input_ids"]]  # fmt: skip
    cot = {r["prompt"] for r in load_rows("cot_study_z_cot")}
    is_cot = [any(prompt in text for prompt in cot) for text in seen]
    assert len(seen) == 2 * (120 + 12)
    assert is_cot == ([False] * 120 + [True] * 12) * 2  # base, then CoT, in each of the two epochs
    assert seen[:120] != seen[132:252]  # each epoch is shuffled anew


def test_max_steps_cannot_order_epochs(tmp_path):
    data = _data(tmp_path)
    data["recipe"]["training"]["max_steps"] = 5
    config = validation_config(data)
    run = next(r for r in plan(config) if r.variant.name == "base->cot")
    with pytest.raises(ConfigError, match="max_steps: base->X orders the data within epochs"):
        run_recipe(config, run)


def test_the_dry_run_checks_every_run_before_any_training(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "none.json").write_text("[]", encoding="utf-8")
    for recipe_change, strategy_data, message in [
        ({"max_steps": 5}, None, r"variant base->cot \(seed 0\): recipe.training.max_steps"),
        ({"num_train_epochs": 1.5}, None, r"variant base->cot .*whole epochs, got 1.5"),
        ({}, ["nope.jsonl"], r"variant base\+cot \(seed 0\): .*file 'nope.jsonl' not found"),
        ({}, [str(tmp_path / "empty.jsonl")], r"variant base\+cot \(seed 0\): .*empty.jsonl' is an empty file"),
        ({}, [str(tmp_path / "none.json")], r"variant base\+cot \(seed 0\): .*none.json' has no rows"),
    ]:
        data = _data(tmp_path)
        data["recipe"]["training"].update(recipe_change)
        if strategy_data:
            data["strategies"]["cot"]["data"] = strategy_data
        path = tmp_path / "v.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        assert cli_main(["validate", "--config", str(path), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err


def test_a_run_of_another_recipe_is_never_reused_or_resumed(tmp_path, monkeypatch):
    trained = []

    def fake_training(recipe, influence):
        trained.append(Path(recipe.training["output_dir"]).name)
        (Path(recipe.training["output_dir"]) / "checkpoint-1").mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(study_module, "run_training", fake_training)
    data = _data(tmp_path, variants=["base", "base->cot"])
    study_module.train_all(config := validation_config(copy.deepcopy(data)), plan(config))
    assert trained == ["base-seed0", "base_then_cot-seed0"]
    study_module.train_all(config, plan(config))  # the same recipe: nothing to train
    assert len(trained) == 2
    changed = copy.deepcopy(data)
    changed["recipe"]["training"]["learning_rate"] = 0.5
    config = validation_config(changed)
    with pytest.raises(ConfigError, match=r"runs/base-seed0: trained with another recipe or data"):
        study_module.train_all(config, plan(config))
    # A run stopped part way with another recipe is not resumed either; nothing is trained before the check.
    done = tmp_path / "study" / "runs" / "base_then_cot-seed0" / "validation_run.json"
    done.unlink()
    again = copy.deepcopy(data)
    again["strategies"]["cot"]["data"] = [{"path": "demo:cot_study_z_cot", "columns": ["prompt", "completion"],
                                           "weight": 2}]  # fmt: skip
    config = validation_config(again)
    with pytest.raises(ConfigError, match=r"base_then_cot-seed0: trained with another recipe"):
        study_module.train_all(config, plan(config))
    assert len(trained) == 2


def test_a_data_file_changed_under_the_same_path_is_another_recipe(tmp_path, monkeypatch):
    """Every local file the recipe names is fingerprinted by content: Base data and a mixed strategy's file alike."""
    monkeypatch.setattr(study_module, "run_training", lambda recipe, influence: None)
    base = tmp_path / "base.jsonl"
    strategy = tmp_path / "strategy.jsonl"
    row = {"prompt": "What is 1 plus 2?", "completion": " 3"}
    for path in (base, strategy):
        path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    data = _data(tmp_path, variants=["base", "base+cot"])
    data["recipe"]["data"]["train"] = [str(base)]
    data["strategies"]["cot"]["data"] = [str(strategy)]
    study_module.train_all(config := validation_config(copy.deepcopy(data)), plan(config))
    study_module.train_all(config, plan(config))  # unchanged files: nothing to train, nothing refused
    for path, run in ((strategy, "base_plus_cot-seed0"), (base, "base-seed0")):
        path.write_text(json.dumps({**row, "completion": " 4"}) + "\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=rf"runs/{run}: trained with another recipe or data"):
            study_module.train_all(config, plan(config))
        path.write_text(json.dumps(row) + "\n", encoding="utf-8")


class _V:
    def __init__(self, n, beats, behind):
        self.n, self.beats, self.behind = n, beats, behind


def test_calls_and_agreement():
    assert swift_call(_V(6, 4, 0)) == "gain" and swift_call(_V(6, 3, 0)) == "no call"
    assert swift_call(_V(6, 0, 5)) == "loss" and swift_call(None) == "no swift study"
    assert measured_call(0.01, 0.2) == "gain" and measured_call(-0.3, -0.01) == "loss"
    assert measured_call(-0.1, 0.1) == "no measurable change"
    assert agreement("gain", "gain") == "agrees" and agreement("gain", "loss") == "disagrees"
    assert agreement("no call", "no measurable change") == "agrees: neither shows a difference"
    assert agreement("gain", "no measurable change") == "inconclusive"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"strategies": {}}, "strategies: name at least one strategy"),
        ({"strategies": {"cot": {"data": ["demo:cot_study_z_cot"], "study": "clarify"}}},
         "strategies.cot.study: the recipe has no study 'clarify'"),
        ({"seeds": [1, 1]}, "seeds: give distinct seeds"),
        ({"seeds": [-1]}, r"seeds\[0\]: a seed is a whole number from 0"),
        ({"variants": ["base+code"]}, "variants\\[0\\]: 'code' in 'base\\+code' is not a strategy"),
        ({"evaluation": {"sets": [{"name": "s", "path": "demo:cot_study_z_similar"}], "models": ["x"]}},
         "evaluation: models and output_dir are filled in by the study"),
    ],
)  # fmt: skip
def test_bad_configs_are_one_line(tmp_path, capsys, change, message):
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(_data(tmp_path, **change)), encoding="utf-8")
    assert cli_main(["validate", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err


def test_a_tiny_study_end_to_end_and_a_rerun_trains_nothing(tmp_path, monkeypatch, capsys):
    data = _data(tmp_path)
    config = validation_config(copy.deepcopy(data))
    results = run_validation(config)
    t2 = results.table2[results.table2.task == "all"]
    assert list(t2.variant) == ["base", "base+cot", "base->cot"] and set(t2.n) == {12}
    assert t2.delta_low.iloc[1] < t2.delta_high.iloc[1]  # never a zero-width interval from 12 examples
    agree = results.agreement
    assert set(agree.swift_metric) == {"CoT → In-task non-CoT", "CoT → Cross-task non-CoT"}
    assert set(agree.variant) == {"base+cot"} and agree.agreement.notna().all()
    for name in ("table2.csv", "table2.md", "agreement.csv", "agreement.md"):
        assert (tmp_path / "study" / name).is_file()
    assert (tmp_path / "study" / "runs" / "base-seed0" / "swift_influence").is_dir()
    assert not (tmp_path / "study" / "runs" / "base_plus_cot-seed0" / "swift_influence").exists()
    monkeypatch.setattr(study_module, "run_training", lambda *a, **k: pytest.fail("a finished run was retrained"))
    again = run_validation(validation_config(copy.deepcopy(data)))
    assert again.table2.equals(results.table2)
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert cli_main(["validate", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Table 2" in out and "Does the swift study predict it?" in out
    assert json.loads((tmp_path / "study" / "runs" / "base-seed0" / "validation_run.json").read_text())["influence"]


def test_the_shipped_recipe_loads():
    config = load_validation_config(RECIPE)
    assert [v.name for v in config.parsed_variants()] == ["base", "base+cot", "base->cot"]


@pytest.mark.parametrize("name", ["table2_paper.yaml", "silly_rules.yaml", "scalequest_check.yaml"])
def test_the_paper_templates_have_no_unknown_keys_or_variants(name):
    from swift_callbacks.configuration import build, load_yaml
    from swift_callbacks.training.config import config_from_dict
    from swift_callbacks.validation import ValidationConfig

    folder = RECIPE.parents[1] / "validation"
    config = build(ValidationConfig, load_yaml(folder / name), "")  # placeholders: no file is opened
    recipe = config_from_dict(load_yaml(folder / config.recipe), resolve_files=False)
    studies = {s.type for s in recipe.influence.studies}
    assert all(s.study in studies for s in config.strategies.values() if s.study)
    assert config.parsed_variants()[0].name == "base"


def test_a_change_over_several_seeds_never_has_a_zero_width_interval():
    import pandas as pd

    from swift_callbacks.evaluation import EvaluateConfig
    from swift_callbacks.validation.tables import _delta

    ids = [f"e{i}" for i in range(12)]
    wrong = pd.DataFrame({0: [0.0] * 12, 1: [0.0] * 12}, index=ids)  # both variants wrong everywhere, 2 seeds
    change = _delta(wrong, wrong.copy(), EvaluateConfig(), "k")
    assert change.value == 0 and change.low < -0.2 and change.high > 0.2  # about Newcombe's [-24%, +24%] for 12
