"""The training config (``swift_callbacks.training.config``): parsing, overrides and every validation error, plus
the shipped recipes (study configs and accelerate configs) being valid. No training here."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
import yaml

from swift_callbacks.configuration import apply_override, parse_bytes, read_yaml
from swift_callbacks.scoring import add_score_parser, score_command
from swift_callbacks.sets import load_set
from swift_callbacks.training import ConfigError, add_train_parser, config_from_dict, load_config
from swift_callbacks.training.tracking import callback_kwargs
from swift_callbacks.training.train import main as train_main
from swift_callbacks.training.train import train_command

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
STUDIES = ("cot", "clarify", "evaluation")

COT_SETS = {"z": "demo:cot_study_z", "z_similar": "demo:cot_study_z_similar"}
MINIMAL = {
    "model": {"name_or_path": "tiny:"},
    "data": {"train": ["demo:base"]},
    "training": {"output_dir": "out", "use_cpu": True, "bf16": False},
    "influence": {
        "probe_sets": {"cot": "demo:cot_study_z_cot"},
        "eval_sets": {"qa": {"path": "demo:cot_study_z_similar"}},
    },
}


def with_value(path: str, value):
    """MINIMAL with ``value`` set at the dotted ``path`` (``[i]`` indexes lists)."""
    data = copy.deepcopy(MINIMAL)
    return apply_override(data, f"{path}={yaml.safe_dump(value, default_flow_style=True).strip()}")


def without(path: str):
    data = copy.deepcopy(MINIMAL)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    del node[last]
    return data


def error_of(data) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, base_dir=RECIPES)
    return str(info.value)


# ------------------------------------------------------------------------------------------ parsing


def test_minimal_config_defaults():
    cfg = config_from_dict(MINIMAL)
    assert cfg.model.tiny_kwargs == {} and cfg.model.dtype == "auto"
    assert cfg.lora is None  # absent: full fine-tuning
    assert cfg.data.train[0].path == "demo:base" and cfg.data.train[0].weight == 1.0
    assert cfg.influence.engine.route == "auto" and cfg.influence.engine.max_feature_bytes == 2 << 30
    assert cfg.influence.schedule.every_n_steps is None
    assert cfg.output_dir == "out"
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # round trip


def test_yaml_reads_exponent_floats_and_overrides(tmp_path):
    assert read_yaml("a: 1e-5\nb: 2E+3\nc: 7\nd: '1e-5'") == {"a": 1e-5, "b": 2000.0, "c": 7, "d": "1e-5"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL), encoding="utf-8")
    cfg = load_config(
        path,
        [
            "training.learning_rate=2e-5",
            "data.train[0]={path: 'demo:base', weight: 1}",
            "data.train[0].weight=0.5",
            "data.train.1.path=demo:cot_study_z",  # .i appends at the end of a list
            "influence.engine.max_feature_bytes=512MiB",
            "lora.r=4",  # creates the section
            "influence.schedule.at_step_zero=true",
        ],
    )
    assert cfg.training["learning_rate"] == 2e-5
    assert cfg.data.train[0].weight == 0.5 and cfg.data.train[1].path == "demo:cot_study_z"
    assert cfg.influence.engine.max_feature_bytes == 512 << 20
    assert cfg.lora.r == 4 and cfg.lora.alpha == 32
    assert cfg.influence.schedule.at_step_zero is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.learning_rate", "expected KEY.PATH=VALUE"),
        ("=3", "expected KEY.PATH=VALUE"),
        ("training..seed=3", "expected KEY.PATH=VALUE"),
        ("data.train[5].weight=1", "data.train: index '5' is not in 0..1"),
        ("model.name_or_path.x=1", "model.name_or_path is the string 'tiny:', not a mapping or list"),
        ("training.seed=[1", "not valid YAML"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        apply_override(copy.deepcopy(MINIMAL), override)


def test_relative_paths_resolve_against_the_config_folder_then_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cwd.jsonl").write_text('{"prompt": "a", "completion": " b"}\n', encoding="utf-8")
    data = with_value("influence.eval_sets.qa", "data/z_pos.jsonl")
    data["influence"]["probe_sets"]["p"] = "cwd.jsonl"
    cfg = config_from_dict(data, base_dir=RECIPES / "clarify")
    assert cfg.influence.eval_sets["qa"] == str(RECIPES / "clarify" / "data" / "z_pos.jsonl")
    assert cfg.influence.probe_sets["p"] == str(tmp_path / "cwd.jsonl")
    assert cfg.data.train[0].path == "demo:base"
    hub = config_from_dict(with_value("data.train[0]", {"path": "org/dataset", "config": "main"}))
    assert hub.data.train[0].path == "org/dataset"  # not a file: a Hub id, left as is


# ------------------------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("trainig", {}, "trainig: unknown key; did you mean 'training'?"),
        ("model.dtpye", "bfloat16", "model.dtpye: unknown key; did you mean 'dtype'?"),
        ("lora.rank", 8, "lora.rank: unknown key"),
        ("data.shufle", True, "data.shufle: unknown key; did you mean 'shuffle'?"),
        ("data.train[0]", {"path": "demo:base", "wieght": 2}, "data.train[0].wieght: unknown key; did you mean"),
        ("training.learning_rat", 1e-5, "training.learning_rat: unknown SFTConfig argument; did you mean 'learning_r"),
        ("influence.schedule.every_n_step", 5, "influence.schedule.every_n_step: unknown key; did you mean 'every_n"),
        ("influence.engine.rout", "ghost", "influence.engine.rout: unknown key; did you mean 'route'?"),
        ("influence.eval_sets.qa", {"path": "demo:base", "splt": "x"}, "influence.eval_sets.qa.splt: unknown key; did"),
        ("influence.studies", [{"type": "cot", "sets": {}, "name": "x"}], "influence.studies[0].name: unknown key"),
        ("influence.studies", [{"type": "cot", "sets": {**COT_SETS, "z_cott": "demo:cot_study_z_cot"}}],
         "influence.studies[0].sets.z_cott: not a set of a cot study; did you mean 'z_cot'?"),
    ],
)  # fmt: skip
def test_unknown_keys_name_their_path(path, value, message):
    assert error_of(with_value(path, value)).startswith(message), error_of(with_value(path, value))


# -------------------------------------------------------------------------------------- bad types


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("model", "Qwen/Qwen2.5-7B", "model: expected a mapping, got the string 'Qwen/Qwen2.5-7B'"),
        ("model.dtype", "fp8", "model.dtype: expected one of 'auto', 'float32', 'bfloat16', 'float16', got the"),
        ("model.trust_remote_code", "yes please", "model.trust_remote_code: expected true or false"),
        ("model.name_or_path", "tiny:hidden=64", "model.name_or_path: 'hidden' in the tiny: spec is unknown"),
        ("model.name_or_path", "tiny:hidden_size=wide", "model.name_or_path (hidden_size): expected an integer"),
        ("lora", {"r": "big"}, "lora.r: expected an integer, got the string 'big'"),
        ("lora", {"r": 0}, "lora.r: must be >= 1, got 0"),
        ("lora", {"dropout": 1.5}, "lora.dropout: must be in [0, 1), got 1.5"),
        ("lora", {"target_modules": [1, 2]}, "lora.target_modules[0]: expected a string, got the number 1"),
        ("data.train", "demo:base", "data.train: expected a list, got the string 'demo:base'"),
        ("data.train", [], "data.train: needs at least one source"),
        ("data.train[0]", {"path": "demo:base", "weight": 0}, "data.train[0].weight: must be > 0, got 0"),
        ("data.train[0]", {"path": "demo:base", "columns": "prompt"}, "data.train[0].columns: expected a list, a map"),
        ("data.train[0]", 5, "data.train[0]: expected a mapping, a string, got the number 5"),
        ("data.train[0]", {"path": "missing/file.jsonl"}, "data.train[0].path: file 'missing/file.jsonl' not found"),
        ("data.train[0]", {"path": "demo:bas"}, "data.train[0].path: no bundled demo file 'demo:bas'; available: ba"),
        ("training.learning_rate", "fast", "training.learning_rate: expected a number, got the string 'fast'"),
        ("training.max_steps", 2.5, "training.max_steps: expected an integer, got the number 2.5"),
        ("training.report_to", 3, "training.report_to: expected a string, a list, got the number 3"),
        ("training.lr_scheduler_type", ["linear"], "training.lr_scheduler_type: expected"),
        ("influence.probe_sets", ["demo:base"], "influence.probe_sets: expected a mapping, got a list"),
        ("influence.engine.route", "fast", "influence.engine.route: expected one of 'auto', 'ghost', 'materialize'"),
        ("influence.engine.micro_batch_size", 0, "influence.engine.micro_batch_size: must be >= 1, got 0"),
        ("influence.engine.max_feature_bytes", "lots", "influence.engine.max_feature_bytes: expected a byte count"),
        ("influence.engine.param_filter", "lora_(", "influence.engine.param_filter: not a valid regex"),
        ("influence.schedule.every_n_steps", 0, "influence.schedule.every_n_steps: must be >= 1, got 0"),
        ("influence.schedule.at_step_zero", "sometimes", "influence.schedule.at_step_zero: expected true or false"),
        ("influence.studies", [{"type": "silly", "sets": {}}], "influence.studies[0].type: unknown study 'silly'"),
        ("influence.eval_sets.cot", "demo:cot_study_z", "influence.eval_sets.cot: also a probe set"),
    ],
)  # fmt: skip
def test_bad_values_name_their_path(path, value, message):
    assert error_of(with_value(path, value)).startswith(message), error_of(with_value(path, value))


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- model\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="config: expected a mapping, got a list"):
        load_config(path)
    path.write_text("model: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "absent.yaml")


def test_sizes():
    assert parse_bytes("2GiB", "x") == 2 << 30
    assert parse_bytes("500 MB", "x") == 500_000_000
    assert parse_bytes(1024, "x") == 1024
    with pytest.raises(ConfigError, match="x: must be at least 1 byte"):
        parse_bytes(0, "x")


# -------------------------------------------------------------------------------- missing required


@pytest.mark.parametrize(
    "path, message",
    [
        ("model", "model: required key is missing"),
        ("model.name_or_path", "model.name_or_path: required key is missing"),
        ("data", "data: required key is missing"),
        ("data.train", "data.train: required key is missing"),
        ("training", "training: required key is missing"),
        ("training.output_dir", "training.output_dir: required key is missing"),
        ("influence.eval_sets", "influence: needs probe_sets and eval_sets, or at least one study"),
    ],
)
def test_missing_required_keys(path, message):
    assert error_of(without(path)) == message


def test_study_sets_required_and_type_required():
    data = with_value("influence.studies", [{"type": "cot", "sets": {"z": "demo:cot_study_z"}}])
    assert error_of(data) == "influence.studies[0].sets.z_similar: required set of a cot study is missing"
    data = with_value("influence.studies", [{"sets": {}}])
    assert error_of(data) == "influence.studies[0].type: required key is missing"
    data = with_value("influence.eval_sets.qa", {"split": "test"})
    assert error_of(data) == "influence.eval_sets.qa.path: required key is missing"


def test_subcommand_parsers_for_swift_study():
    """``add_train_parser`` / ``add_score_parser`` plug into the ``swift-study`` subcommands."""
    parser = argparse.ArgumentParser(prog="swift-study")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_score_parser(sub)
    args = parser.parse_args(["train", "--config", "c.yaml", "--set", "lora.r=8", "--set", "seed=1", "--no-influence"])
    assert (args.func, args.config, args.overrides, args.no_influence) == (
        train_command,
        "c.yaml",
        ["lora.r=8", "seed=1"],
        True,
    )
    args = parser.parse_args(["score", "--run", "out", "--steps", "50", "100"])
    assert (args.func, args.run, args.config, args.steps, args.output_dir) == (
        score_command,
        "out",
        None,
        [50, 100],
        None,
    )


def test_cli_reports_config_errors(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL), encoding="utf-8")
    assert train_main(["--config", str(path), "--set", "influence.engine.rout=ghost"]) == 2
    assert "influence.engine.rout: unknown key; did you mean 'route'?" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the recipes


@pytest.mark.parametrize("study", STUDIES)
def test_tiny_recipes_are_valid_and_register_their_study(study):
    cfg = load_config(RECIPES / study / "config_tiny_cpu.yaml")
    assert cfg.model.tiny_kwargs is not None and cfg.training["use_cpu"] is True
    assert [s.type for s in cfg.influence.studies] == [study]
    kwargs = callback_kwargs(cfg.influence)
    (built,) = kwargs["studies"]
    assert built.name == study and built.metrics
    for sets in (built.probe_sets, built.eval_sets):
        for source in sets.values():
            example_set = load_set("set", source)  # the callback's own loader and checks
            assert example_set.has_tasks and example_set.format == "prompt_completion"
            assert all("id" in r for r in example_set.rows)


def test_shared_sets_are_one_object_across_studies():
    """The clarification and evaluation studies share Z_pos, Z'_pos, Z'_neg: given the same paths, the callback
    must receive the same objects (merge_studies rejects one name bound to two different sets)."""
    clarify = load_config(RECIPES / "clarify" / "config_tiny_cpu.yaml")
    evaluation = load_config(RECIPES / "evaluation" / "config_tiny_cpu.yaml")
    clarify.influence.studies.append(evaluation.influence.studies[0])
    for name in ("z_pos", "z_pos_similar", "z_neg_similar"):  # point both at one file
        clarify.influence.studies[1].sets[name] = clarify.influence.studies[0].sets[name]
    first, second = callback_kwargs(clarify.influence)["studies"]
    assert first.probe_sets["pos"] is second.probe_sets["pos"]
    assert first.eval_sets["neg_similar"] is second.eval_sets["neg_similar"]


@pytest.mark.parametrize("study", STUDIES)
def test_paper_recipes_match_the_paper(study):
    cfg = load_config(RECIPES / study / "config_paper.yaml", resolve_files=False)  # data paths are placeholders
    t = cfg.training
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (64, 512, ["up_proj", "down_proj"])
    assert t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * 8 == 32  # 8-process configs
    assert (t["num_train_epochs"], t["save_steps"], t["warmup_steps"], t["learning_rate"]) == (6, 50, 10, 1e-5)
    assert cfg.influence.schedule.at_step_zero and cfg.influence.studies[0].type == study
    # The schedule rises over 10 warmup steps, decays linearly, and ends exactly at 1e-7.
    import torch
    from transformers import get_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=t["learning_rate"])
    total = 1200
    scheduler = get_scheduler(
        t["lr_scheduler_type"], optimizer, num_warmup_steps=t["warmup_steps"], num_training_steps=total,
        scheduler_specific_kwargs=t["lr_scheduler_kwargs"],
    )  # fmt: skip
    lrs = []
    for _ in range(total + 1):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[10] == pytest.approx(1e-5) and lrs[total] == pytest.approx(1e-7, rel=1e-9)
    mid = lrs[10 + (total - 10) // 2]
    assert mid == pytest.approx((1e-5 + 1e-7) / 2, rel=1e-3)  # linear: halfway is the mean
    with pytest.raises(ConfigError, match=r"data\.train\[0\]\.path: file 'paper_data/base\.jsonl' not found"):
        load_config(RECIPES / study / "config_paper.yaml")


ACCELERATE = {
    "single_gpu": ("NO", 1, {}),
    "ddp": ("MULTI_GPU", 8, {}),
    "cpu_ddp": ("MULTI_GPU", 2, {}),
    "fsdp": ("FSDP", 8, {"fsdp_version": 1}),
    "fsdp2": ("FSDP", 8, {"fsdp_version": 2}),
    "zero2": ("DEEPSPEED", 8, {"zero_stage": 2}),
    "zero3": ("DEEPSPEED", 8, {"zero_stage": 3, "zero3_init_flag": True}),
}


@pytest.mark.parametrize("name", sorted(ACCELERATE))
def test_accelerate_configs_load_with_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    distributed, processes, extra = ACCELERATE[name]
    cfg = load_config_from_file(str(RECIPES / "accelerate_configs" / f"{name}.yaml"))
    assert cfg.distributed_type.value == distributed and cfg.num_processes == processes
    # use_cpu: true (or MULTI_CPU) would make accelerate start one process; CPU placement comes from the
    # training config's use_cpu instead.
    assert cfg.use_cpu is False
    for key, value in extra.items():
        assert {**cfg.fsdp_config, **cfg.deepspeed_config}[key] == value
    if name == "fsdp2":  # options FSDP2 does not have must be absent (accelerate warns or fails on them)
        assert not {"fsdp_forward_prefetch", "fsdp_backward_prefetch", "fsdp_use_orig_params"} & set(cfg.fsdp_config)
    assert cfg.mixed_precision == ("no" if name == "cpu_ddp" else "bf16")


# ------------------------------------------------------------------------------------ data sources


def test_mixture_weights_columns_and_local_files(tmp_path):
    from swift_callbacks.training.config import MixtureSource, SourceConfig
    from swift_callbacks.training.data import build_mixture, load_source

    z = MixtureSource("demo:cot_study_z", weight=2.5)  # 12 rows: twice, plus a random half
    similar = MixtureSource("demo:cot_study_z_similar", weight=0.5)
    mixture = build_mixture([z, similar], seed=0)
    assert len(mixture) == 12 * 2 + 6 + 6
    ids = mixture["id"]
    assert sum(i.endswith("-zsim") for i in ids) == 6 and len(set(ids) - {i for i in ids if i.endswith("-zsim")}) == 12
    assert build_mixture([z, similar], seed=0)["id"] == ids  # seeded
    with pytest.raises(ValueError, match="different columns"):
        build_mixture([MixtureSource("demo:base", columns=["prompt", "completion"]), similar])
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "q1", "answer": " a1", "x": 1}\n{"question": "q2", "answer": " a2", "x": 2}\n')
    renamed = load_source(SourceConfig(str(path), columns={"question": "prompt", "answer": "completion"}))
    assert renamed.column_names == ["prompt", "completion"] and renamed["prompt"] == ["q1", "q2"]
    with pytest.raises(ValueError, match=r"columns \['prompt'\] not found"):
        load_source(SourceConfig(str(path), columns=["prompt"]))
