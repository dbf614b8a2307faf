"""Mistakes a user makes, through the real commands: one line, exit 2, no traceback; and partial settings keep
their own defaults. (Found by a review of the one-place-per-concept refactor.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from swift_callbacks import cli
from swift_callbacks.builders.scalequest.stages.generate import GenerateSettings
from swift_callbacks.configuration import ConfigError, build
from swift_callbacks.models import parse_tiny

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "cot" / "config_tiny_cpu.yaml")
SEEDS = str(Path(__file__).resolve().parents[1] / "recipes" / "scalequest" / "data" / "seed_problems.jsonl")


def test_a_partial_nested_section_keeps_the_fields_own_defaults():
    settings = build(GenerateSettings, {"sampling": {"max_tokens": 8}}, "stages.generate")
    assert (settings.sampling.temperature, settings.sampling.top_p, settings.sampling.max_tokens) == (1.0, 0.99, 8)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("tiny:hidden_size=0", "must be >= 1"), ("tiny:arch=bogus", "'llama' or 'qwen2'"),
     ("tiny:hidden_size=64,num_heads=3", "not a multiple of num_heads")],
)  # fmt: skip
def test_tiny_values_that_cannot_build_a_model_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_tiny(spec, "model")


def _cases(tmp: Path) -> list[tuple[list[str], str]]:
    fake = tmp / "fake.gguf"
    fake.write_text("not a gguf file")
    (tmp / "empty").mkdir()
    (tmp / "afile").write_text("x")
    (tmp / "bad.yaml").write_text("model: {name_or_path: [\n")
    (tmp / "notjson.jsonl").write_text("this is not json\n")
    train = ["train", "--config", RECIPE, "--set", "training.max_steps=1"]
    return [
        ([*train, "--set", f"model.name_or_path={fake}"], "not a readable GGUF file"),
        ([*train, "--set", f"model.name_or_path={tmp / 'empty'}"], "cannot load"),
        ([*train, "--set", f"training.output_dir={tmp / 'afile'}"], "is a file, not a folder"),
        ([*train, "--set", f"data.train[0].path={tmp / 'notjson.jsonl'}"], "cannot be read"),
        ([*train, "--set", "lora.target_modules=[nope_proj]"], "lora.target_modules: ['nope_proj'] names no module"),
        (["train", "--config", str(tmp / "bad.yaml")], "is not valid YAML: line"),
        (["build", "cot", "--input", str(tmp / "empty"), "--dry-run"], "is a folder"),
        (["scalequest", "filter-language", "--input", str(tmp / "none.jsonl"), "--output", str(tmp / "o.jsonl")],
         "does not exist"),
        (["scalequest", "filter-language", "--input", SEEDS, "--output", str(tmp / "o.json")], "must be a .jsonl"),
    ]  # fmt: skip


def test_user_errors_through_every_command_are_one_line(tmp_path, capsys):
    for argv, message in _cases(tmp_path):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        ours = [line for line in err.splitlines() if f"swift-study {argv[0]}: error:" in line]
        # One error line (libraries may print progress bars or their own log lines besides), never a traceback.
        assert "Traceback" not in err and len(ours) == 1 and message in ours[0], (argv, err)
    assert not (tmp_path / "o.json").exists()


def test_engine_options_stay_settable_and_checked():
    import torch

    from swift_callbacks import InfluenceEngine

    engine = InfluenceEngine(torch.nn.Linear(2, 2), route="ghost")
    engine.verify = False
    engine.micro_batch_size = 2
    assert (engine.verify, engine.micro_batch_size, engine.args.route) == (False, 2, "ghost")
    with pytest.raises(ConfigError, match="micro_batch_size"):
        engine.micro_batch_size = 0
