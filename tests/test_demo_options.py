"""``swift-study demo`` options and presets, the plain-language reading, and a short run on the tiny model."""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import pytest
import yaml
from helpers import torch_threads

from swift_callbacks.cli import build_parser, main
from swift_callbacks.demo.options import BASE_EXAMPLES, PRESETS, QUICK, SMOLLM2, DemoConfig, DemoError, make_config
from swift_callbacks.demo.reading import verdict_reading
from swift_callbacks.demo.run import study_recipe


def test_the_default_demo_keeps_the_paper_schedule():
    assert make_config("out") == DemoConfig("out")  # no --model: the paper preset, i.e. the old defaults
    cfg = DemoConfig("out")
    assert (cfg.epochs, cfg.save_every, cfg.batch_size, cfg.max_length, cfg.max_steps, cfg.examples) == (
        6.0, 30, 16, 256, None, None,
    )  # fmt: skip
    assert cfg.lora_modules == ["up_proj", "down_proj"] and cfg.at_step_zero and cfg.track is None
    recipe = study_recipe(cfg, "model")
    assert recipe["data"]["train"] == [{"path": "demo:base", "columns": ["prompt", "completion"]}]
    assert "max_steps" not in recipe["training"] and "engine" not in recipe["influence"]


def test_a_real_model_gets_the_quick_preset_and_options_override_it():
    cfg = make_config("out", "some/model")
    assert {k: getattr(cfg, k) for k in PRESETS[QUICK]} == PRESETS[QUICK] and cfg.lora_layers is None
    recipe = study_recipe(cfg, "some/model")
    assert recipe["training"]["max_steps"] == 24 and recipe["training"]["max_length"] == 128
    assert recipe["data"]["train"][0]["weight"] * BASE_EXAMPLES == pytest.approx(96)
    assert recipe["influence"]["engine"] == {"param_filter": "lora_B"}
    assert recipe["lora"]["target_modules"] == ["up_proj", "down_proj"]
    # smollm2 (30 layers): the quick schedule with LoRA on the last 6 layers, as one regex PEFT matches whole names
    smol = make_config("out", "smollm2")
    assert {k: getattr(smol, k) for k in PRESETS[SMOLLM2]} == PRESETS[SMOLLM2] and smol.lora_layers == "24-29"
    pattern = study_recipe(smol, "smollm2")["lora"]["target_modules"]
    assert re.fullmatch(pattern, "model.layers.24.mlp.up_proj") and re.fullmatch(
        pattern, "model.layers.29.mlp.down_proj"
    )
    assert not re.fullmatch(pattern, "model.layers.2.mlp.up_proj") and not re.fullmatch(
        pattern, "model.layers.24.self_attn.q_proj"
    )
    args = build_parser().parse_args(["demo", "--output-dir", "o", "--model", "m", "--max-steps", "8",
                                      "--lora-modules", "down_proj", "--no-at-step-zero"])  # fmt: skip
    cfg = make_config(args.output_dir, args.model, args.preset, **_options(args))
    assert (cfg.max_steps, cfg.lora_modules, cfg.at_step_zero, cfg.examples) == (8, ["down_proj"], False, 96)
    assert make_config("o", "m", "paper").max_steps is None  # --preset paper on a real model: the old schedule


def _options(args) -> dict:
    from swift_callbacks.demo.options import options_from_args

    return options_from_args(args)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--examples", "1000"], f"--examples 1000: the bundled base set has {BASE_EXAMPLES} examples"),
        (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
        (["--lora-modules", ","], "--lora-modules must name modules"),
        (["--lora-layers", "9-3"], "--lora-layers must be a range FIRST-LAST of layer numbers, got '9-3'"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["demo", "--output-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("swift-study demo: error: ") and message in err and err.count("\n") == 1
    assert "Traceback" not in err and not list(tmp_path.iterdir())  # refused before anything ran


def test_make_config_names_an_unknown_setting():
    with pytest.raises(DemoError, match="unknown demo settings: steps"):
        make_config("o", steps=3)
    with pytest.raises(DemoError, match="unknown --preset 'fast'"):
        make_config("o", preset="fast")


def _verdict(**kw) -> SimpleNamespace:
    base = {"strategy": "CoT → In-task non-CoT", "baseline": "non-CoT → In-task non-CoT", "n": 5, "beats": 0,
            "behind": 0, "not_robust": 0, "beats_relinf": 0, "beats_cosine": 0, "mean_diff": 0.2,
            "ahead_from": None, "trend": "no clear trend", "cautions": ()}  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_the_reading_says_what_the_verdict_does_and_does_not_show():
    text = verdict_reading(_verdict())
    assert "above it beyond doubt at 0 of 5 checkpoints" in text and "at 5 the 95% interval" in text
    assert "this run does not show CoT data's influence differing from plain QA's" in text
    text = verdict_reading(_verdict(beats=3, beats_relinf=3, beats_cosine=3, ahead_from=20, trend="rising"))
    assert "at 3 of 5 checkpoints" in text and "at 2 the 95% interval" in text
    assert "ahead of the baseline at some checkpoints (from step 20 on) only" in text and "rising" in text
    text = verdict_reading(_verdict(beats=5, beats_relinf=5, beats_cosine=1))
    assert "above the baseline at every checkpoint" in text and "not by cosine" in text
    # A report version with robust counts: calls the median or the cosine does not share are named apart.
    text = verdict_reading(_verdict(not_robust=2, beats_relinf=2))
    assert "not robust at 2" in text and "at 3 the 95% interval" in text and "does not show" in text
    # Without the robust fields (an older report), the reading still works.
    older = _verdict()
    del older.not_robust, older.beats_relinf
    assert "at 5 the 95% interval" in verdict_reading(older)


def test_short_demo_on_the_tiny_model(tmp_path, capsys):
    """The new options end to end on the tiny model, in seconds: a shortened schedule, the reading, the figure."""
    argv = ["demo", "--output-dir", str(tmp_path), "--warmup-epochs", "0.2", "--examples", "24", "--batch-size", "8",
            "--max-steps", "4", "--save-every", "2", "--max-length", "64", "--lora-modules", "down_proj"]  # fmt: skip
    with torch_threads(1):  # a tiny model: one thread is as fast, and spares a busy machine's spin-waits
        assert main(argv) == 0
    out = capsys.readouterr().out
    recipe = yaml.safe_load((tmp_path / "run" / "swift_train_config.yaml").read_text(encoding="utf-8"))
    assert recipe["training"]["max_steps"] == 4 and recipe["training"]["max_length"] == 64
    assert recipe["lora"]["target_modules"] == ["down_proj"]
    assert round(recipe["data"]["train"][0]["weight"] * BASE_EXAMPLES) == 24
    from swift_callbacks import load_scores

    assert sorted(load_scores(tmp_path / "run").step.unique()) == [0, 2, 4]
    assert "What this run shows (plain reading of the report's verdicts):" in out
    assert "CoT → In-task non-CoT vs non-CoT → In-task non-CoT:" in out and "of 3 checkpoints" in out
    cautions = out.split("Cautions:")[1]
    assert "Few examples: 12 evaluation examples" in cautions and "say nothing about real models" in cautions
    assert (tmp_path / "cot_study.png").stat().st_size > 10_000


def test_every_tunable_field_is_an_option():
    parser = build_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]
    flags = {s for a in demo._actions for s in a.option_strings}
    fields = [f.name for f in dataclasses.fields(DemoConfig) if "help" in f.metadata]
    assert all("--" + name.replace("_", "-") in flags for name in fields)
