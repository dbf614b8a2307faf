"""``swift-study scalequest ...``: the whole pipeline from a config, or one stage from files.

The top-level CLI adds this with ``add_scalequest_parser(subparsers)``; ``python -m
swift_callbacks.builders.scalequest`` runs the same commands on their own.

    swift-study scalequest run --config recipes/scalequest/pipeline_tiny_cpu.yaml --output-dir runs/sq
    swift-study scalequest filter-solvable --input q.jsonl --output solvable.jsonl --base-url URL --model NAME
    swift-study scalequest respond --input q.jsonl --output r.jsonl --local-model ./solver --set n=8

Every stage command reads its settings from ``--config`` (that stage's section of a pipeline config) and
``--set KEY=VALUE`` (over the config; dotted keys reach nested settings and ``[i]`` list items, e.g. ``--set
sampling.temperature=0.5``, ``--set eval_sets[0].name=gsm8k``); ``run --set`` takes full key paths
(``--set stages.respond.n=8``).
The stage's main generation model comes from the shared backend options (``--base-url``/``--model``,
``--local-model``, ``--vllm-model``) or a model spec (``--spec``); other roles have their own ``--<role>`` option.
Which options a stage has comes from its class (:mod:`.stages`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from ...configuration import ConfigError, add_override_argument, apply_override, build, load_yaml
from ...errors import run_command
from ...generation.factory import BASE_URL_ENV, MODEL_ENV, add_backend_arguments
from .config import StageConfig, load_pipeline_config
from .contract import StageError
from .models import ModelSpec
from .prompts import Prompts
from .runner import execute_stage, run_pipeline, stage_fingerprint
from .stages import OPTIONAL, REQUIRED, STAGE_ORDER, STAGES, Stage, StageRun

_BACKEND_FLAGS = "--spec or --base-url/--model, --local-model, --vllm-model"


def add_scalequest_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``scalequest`` command (with ``run`` and one sub-command per stage) to a sub-command set.

    Args:
        subparsers: What ``parser.add_subparsers()`` returned.

    Returns:
        The ``scalequest`` parser; each sub-command's ``func`` default runs it and returns an exit code.
    """
    parser = subparsers.add_parser("scalequest", help="ScaleQuest question synthesis: the pipeline or one stage",
                                   description="ScaleQuest question synthesis from scratch.")  # fmt: skip
    commands = parser.add_subparsers(dest="scalequest_command", required=True, metavar="COMMAND")
    _add_run_parser(commands)
    for stage in STAGES.values():
        _add_stage_parser(commands, stage)
    return parser


def _add_run_parser(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="run the pipeline's stages in order from a config (complete ones skipped)")
    run.add_argument("--config", required=True, help="pipeline config YAML (see recipes/scalequest/)")
    run.add_argument("--output-dir", required=True, help="where every stage's outputs go")
    run.add_argument("--stages", default=None, help=f"comma-separated subset of: {','.join(STAGE_ORDER)}")
    add_override_argument(run, "stages.respond.n=8")
    run.set_defaults(func=run_from_args)


def _add_stage_parser(commands: argparse._SubParsersAction, stage: Stage) -> None:
    parser = commands.add_parser(stage.name, help=stage.help, description=stage.help)
    data = parser.add_argument_group("data")
    if stage.reads_input:
        data.add_argument("--input", default=None, help="input file (default: the stage's 'input' in --config)")
    data.add_argument("--output", required=True, help="output JSONL (training stages: the model folder)")
    settings = parser.add_argument_group("settings")
    settings.add_argument("--config", default=None, help="pipeline config whose section for this stage to start from")
    add_override_argument(settings, "sampling.temperature=0.5", what="a stage setting")
    if stage.uses_prompts:
        settings.add_argument("--prompts", default=None, metavar="FILE", help="YAML overriding prompt templates")
    stage.add_arguments(settings)
    roles = parser.add_argument_group("models")
    for role, flag in stage.role_flags.items():
        roles.add_argument(flag, dest=f"role_{role}", default=None, metavar="SPEC", help=f"model spec of the {role}")
    if stage.main_role:
        roles.add_argument("--spec", default=None, metavar="SPEC",
                           help=f"model spec of the {stage.main_role} (tiny:..., vllm:PATH, a folder, a registered "
                                "backend) instead of the backend options")  # fmt: skip
        roles.add_argument("--tokenizer", dest="spec_tokenizer", default=None,
                           help="tokenizer folder/id (for chat prefixes of an OpenAI-compatible server)")  # fmt: skip
        add_backend_arguments(parser)
    parser.set_defaults(func=stage_from_args, stage=stage.name)


# ------------------------------------------------------------------------------------------------ running


def run_from_args(args: argparse.Namespace) -> int:
    """``scalequest run``: the pipeline. Returns 0, 1 (a stage failed) or 2 (configuration error)."""
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    return _guarded(lambda: run_pipeline(args.config, args.output_dir, stages, overrides=args.overrides))


def stage_from_args(args: argparse.Namespace) -> int:
    """``scalequest <stage>``: one stage from files. Returns 0, 1 (the stage failed) or 2 (configuration error)."""
    return _guarded(lambda: _run_stage(args))


def _guarded(action) -> int:
    """A stage that cannot do its work exits 1; a user error (config, files) is left to ``errors.run_command``."""
    try:
        action()
    except StageError as err:
        print(f"swift-study scalequest: stage failed: {err}", file=sys.stderr)
        return 1
    return 0


def _run_stage(args: argparse.Namespace) -> None:
    stage = STAGES[args.stage]
    base = load_pipeline_config(args.config).stages[stage.name] if args.config else None
    config = StageConfig(_settings(args, stage, base), _roles(args, stage, base), None)
    source = getattr(args, "input", None) or (base.input if base else None)
    if source is None and stage.reads_input:
        raise ConfigError(f"{stage.name}: --input is required")
    prompts_file = getattr(args, "prompts", None)
    prompts = build(Prompts, load_yaml(prompts_file) if prompts_file else None, "prompts")
    cache = getattr(args, "cache_dir", None)
    run = StageRun(stage, config.settings, config.models, Path(source) if source else None, Path(args.output),
                   Path(cache) if cache else None, prompts)  # fmt: skip
    if run.input is not None and not run.input.is_file():
        what = "is a folder, not a file" if run.input.is_dir() else "does not exist"
        raise ConfigError(f"{stage.name}: input {str(run.input)!r} {what}")
    if stage.output_name.endswith(".jsonl") and run.output.suffix.lower() != ".jsonl":
        raise ConfigError(f"{stage.name}: --output must be a .jsonl file (rows are written as JSON lines), got "
                          f"{str(run.output)!r}")  # fmt: skip
    run.fingerprint = stage_fingerprint(run)
    execute_stage(run)


def _settings(args: argparse.Namespace, stage: Stage, base: StageConfig | None) -> Any:
    """The stage's settings: its ``--config`` section, then ``--set``, then the sampling and stage options."""
    data: dict[str, Any] = dataclasses.asdict(base.settings) if base else {}
    for item in args.overrides:
        data = apply_override(data, item)
    if stage.sampling_field:
        given = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                   ("max_tokens", args.max_tokens)) if v is not None}  # fmt: skip
        if given:
            data[stage.sampling_field] = {**(data.get(stage.sampling_field) or {}), **given}
        if args.seed is not None and "seed" in {f.name for f in dataclasses.fields(stage.settings)}:
            data["seed"] = args.seed
    stage.apply_arguments(args, data)
    settings = build(stage.settings, data, stage.name)
    stage.check(settings, stage.name)
    return stage.resolve_paths(settings, Path.cwd(), stage.name)


def _roles(args: argparse.Namespace, stage: Stage, base: StageConfig | None) -> dict[str, ModelSpec | None]:
    roles: dict[str, ModelSpec | None] = dict(base.models) if base else {}
    for role, flag in stage.role_flags.items():
        value = getattr(args, f"role_{role}", None)
        if value:
            roles[role] = ModelSpec.parse(value, flag)
    if stage.main_role:
        spec = _main_spec(args)
        if spec is not None:
            roles[stage.main_role] = spec
    for role, default in stage.roles.items():
        if roles.get(role) is None and default not in (REQUIRED, OPTIONAL) and not default.startswith("stage:"):
            roles[role] = ModelSpec.parse(default, role)
    for role, spec in roles.items():
        if spec is not None and spec.backend == "stage":
            flag = stage.role_flags.get(role, "--spec")
            raise ConfigError(f"{stage.name}: the {role} is 'stage:{spec.model}', which only the pipeline can resolve; "
                              f"give the model folder with {flag}")  # fmt: skip
    missing = [r for r, d in stage.roles.items() if roles.get(r) is None and d != OPTIONAL]
    if missing:
        flags = "; ".join(stage.role_flags.get(r) or _BACKEND_FLAGS for r in missing)
        raise ConfigError(f"{stage.name}: no model for {', '.join(missing)}; give {flags}")
    return roles


def _main_spec(args: argparse.Namespace) -> ModelSpec | None:
    """The main role's model from ``--spec`` or the shared backend options (None when neither is given)."""
    chosen = [
        flag
        for flag, value in (
            ("--spec", args.spec),
            ("--base-url", args.base_url),
            ("--local-model", args.local_model),
            ("--vllm-model", args.vllm_model),
        )
        if value
    ]
    if len(chosen) > 1:
        raise ConfigError(f"choose one model for the {STAGES[args.stage].main_role}, got {' and '.join(chosen)}")
    if args.spec:
        spec = ModelSpec.parse(args.spec, "--spec")
    elif args.local_model:
        spec = ModelSpec("transformers", model=args.local_model, batch_size=args.batch_size, device=args.device,
                         dtype=args.dtype)  # fmt: skip
    elif args.vllm_model:
        spec = ModelSpec("vllm", model=args.vllm_model)
    elif args.base_url or os.environ.get(BASE_URL_ENV):
        model = args.model or os.environ.get(MODEL_ENV)
        if not model:
            raise ConfigError(f"--base-url needs --model (or {MODEL_ENV})")
        spec = ModelSpec("openai", model=model, base_url=args.base_url or os.environ[BASE_URL_ENV],
                         api_key_env=args.api_key_env, max_concurrency=args.max_concurrency, timeout=args.timeout,
                         max_retries=args.max_retries)  # fmt: skip
    else:
        return None
    if args.spec_tokenizer:
        spec = dataclasses.replace(spec, tokenizer=args.spec_tokenizer)
    return spec


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone ``swift-study``-like parser holding only the ``scalequest`` command."""
    parser = argparse.ArgumentParser(prog="swift-study")
    add_scalequest_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``scalequest`` commands: ``python -m swift_callbacks.builders.scalequest run --config ...``."""
    args = build_parser().parse_args(["scalequest", *(sys.argv[1:] if argv is None else argv)])
    return run_command("swift-study scalequest", args.func, args)
