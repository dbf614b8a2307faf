"""``swift-study scalequest ...``: the whole pipeline from a config, or one stage from files.

The top-level CLI adds this with ``add_scalequest_parser(subparsers)``; ``python -m
swift_callbacks.builders.scalequest`` runs the same commands on their own.

    swift-study scalequest run --config recipes/scalequest/pipeline_tiny_cpu.yaml --output-dir runs/sq
    swift-study scalequest filter-solvable --input q.jsonl --output solvable.jsonl --base-url URL --model NAME
    swift-study scalequest respond --input q.jsonl --output r.jsonl --local-model ./solver --set n=8

Every stage command reads its settings from ``--config`` (that stage's section of a pipeline config) and
``--set KEY=VALUE`` (over the config; dotted keys reach nested settings, e.g. ``--set sampling.temperature=0.5``).
The stage's main generation model comes from the shared backend options (``--base-url``/``--model``,
``--local-model``, ``--vllm-model``) or a model spec (``--spec``); other roles have their own ``--<role>`` option.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .config import OPTIONAL, REQUIRED, STAGE_DEFS, STAGE_ORDER, StageConfig, load_pipeline_config
from .contract import StageError
from .models import ConfigError, ModelSpec
from .prompts import Prompts
from .settings import build_settings, parse_assignments

# Per stage: the role the backend options choose, the other roles (as --options) and the sampling field the
# --temperature/--top-p/--max-tokens options set.
MAIN_ROLE = {"qpo-pairs": "rewriter", "generate": "model", "filter-solvable": "judge", "difficulty": "solver",
             "respond": "model"}  # fmt: skip
SPEC_OPTIONS = {"qft-data": {"model": "--tokenizer"}, "qft": {"model": "--base"}, "qpo": {"model": "--base"},
                "qpo-pairs": {"model": "--sampler"}, "difficulty": {"scorer_model": "--scorer-model"},
                "reward-select": {"reward_model": "--reward-model"}}  # fmt: skip
SAMPLING_FIELD = {"qpo-pairs": "rewrite_sampling", "generate": "sampling", "filter-solvable": "sampling",
                  "difficulty": "sampling", "respond": "sampling"}  # fmt: skip
HELP = {
    "qft-data": "questions-only SFT rows (prompt = chat prefix, completion = question + EOS) from a seed set",
    "qft": "question fine-tuning: TRL SFT (1 epoch, packing, max length 256, lr 2e-5)",
    "qpo-pairs": "sample questions from the QFT model, rewrite them for solvability or difficulty -> DPO pairs",
    "qpo": "question preference optimization: TRL DPO (lr 5e-7, beta 0.1, 1 epoch)",
    "generate": "questions from the chat prefix only (temperature 1.0, top-p 0.99, max 512 tokens)",
    "filter-language": "keep non-empty, all-ASCII questions",
    "filter-solvable": "keep questions an LLM judge calls solvable (strict final Yes/No)",
    "difficulty": "fail-rate labels, a regression scorer, drop the easiest fraction",
    "respond": "n step-by-step solutions per question, kept only with a final \\boxed{} answer",
    "reward-select": "keep the best solution per question by a reward model",
    "decontaminate": "drop rows sharing a 13-gram with an evaluation set",
}


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
    for name in STAGE_ORDER:
        _add_stage_parser(commands, name)
    return parser


def _add_run_parser(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="run the pipeline's stages in order from a config (complete ones skipped)")
    run.add_argument("--config", required=True, help="pipeline config YAML (see recipes/scalequest/)")
    run.add_argument("--output-dir", required=True, help="where every stage's outputs go")
    run.add_argument("--stages", default=None, help=f"comma-separated subset of: {','.join(STAGE_ORDER)}")
    run.set_defaults(func=run_from_args)


def _add_stage_parser(commands: argparse._SubParsersAction, name: str) -> None:
    from ...generation.factory import add_backend_arguments

    parser = commands.add_parser(name, help=HELP[name], description=HELP[name])
    stage = STAGE_DEFS[name]
    data = parser.add_argument_group("data")
    if name not in ("qpo-pairs", "generate"):
        data.add_argument("--input", default=None, help="input file (default: the stage's 'input' in --config)")
    data.add_argument("--output", required=True, help="output JSONL (training stages: the model folder)")
    settings = parser.add_argument_group("settings")
    settings.add_argument("--config", default=None, help="pipeline config whose section for this stage to start from")
    settings.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="a stage setting (YAML value; dotted keys for nested settings); repeatable")  # fmt: skip
    if stage.uses_prompts:
        settings.add_argument("--prompts", default=None, metavar="FILE", help="YAML overriding prompt templates")
    if name == "decontaminate":
        settings.add_argument("--eval", action="append", default=[], metavar="PATH[:FIELD,...]",
                              help="evaluation set and its text fields (default: question); repeatable")  # fmt: skip
    roles = parser.add_argument_group("models")
    for role, flag in SPEC_OPTIONS.get(name, {}).items():
        roles.add_argument(flag, dest=f"role_{role}", default=None, metavar="SPEC", help=f"model spec of the {role}")
    if name in MAIN_ROLE:
        roles.add_argument("--spec", default=None, metavar="SPEC",
                           help=f"model spec of the {MAIN_ROLE[name]} (tiny:..., scripted:..., vllm:PATH, a folder) "
                                "instead of the backend options")  # fmt: skip
        roles.add_argument("--tokenizer", dest="spec_tokenizer", default=None,
                           help="tokenizer folder/id (for chat prefixes of an OpenAI-compatible server)")  # fmt: skip
        add_backend_arguments(parser)
    elif name == "reward-select":
        parser.add_argument("--cache-dir", default=".swift_cache/generation", help="score cache directory")
    parser.set_defaults(func=stage_from_args, stage=name)


# ------------------------------------------------------------------------------------------------ running


def run_from_args(args: argparse.Namespace) -> int:
    """``scalequest run``: the pipeline. Returns 0, 1 (a stage failed) or 2 (configuration error)."""
    from .runner import run_pipeline

    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    return _guarded(lambda: run_pipeline(args.config, args.output_dir, stages))


def stage_from_args(args: argparse.Namespace) -> int:
    """``scalequest <stage>``: one stage from files. Returns 0, 1 (the stage failed) or 2 (configuration error)."""
    return _guarded(lambda: _run_stage(args))


def _guarded(action) -> int:
    try:
        action()
    except (ConfigError, FileNotFoundError) as err:
        print(f"swift-study scalequest: error: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(f"swift-study scalequest: stage failed: {err}", file=sys.stderr)
        return 1
    return 0


def _run_stage(args: argparse.Namespace) -> None:
    from .runner import StageRun, execute_stage, stage_fingerprint

    name = args.stage
    stage = STAGE_DEFS[name]
    base = load_pipeline_config(args.config).stages[name] if args.config else None
    config = StageConfig(_settings(args, base), _roles(args, base), None)
    source = getattr(args, "input", None) or (base.input if base else None)
    if source is None and (stage.input_from or name == "qft-data"):
        raise ConfigError(f"{name}: --input is required")
    prompts = build_settings(Prompts, _read_yaml_file(getattr(args, "prompts", None)), "prompts")
    cache = getattr(args, "cache_dir", None)
    run = StageRun(name, config, Path(source) if source else None, Path(args.output), Path(cache) if cache else None,
                   prompts)  # fmt: skip
    if run.input is not None and not run.input.exists():
        raise StageError(f"{name}: input {str(run.input)!r} does not exist")
    run.fingerprint = stage_fingerprint(run)
    execute_stage(run)


def _settings(args: argparse.Namespace, base: StageConfig | None) -> Any:
    import dataclasses

    name = args.stage
    cls = STAGE_DEFS[name].settings
    data = dataclasses.asdict(base.settings) if base else {}
    _merge(data, parse_assignments(args.set))
    field = SAMPLING_FIELD.get(name)
    if field:
        given = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                   ("max_tokens", args.max_tokens)) if v is not None}  # fmt: skip
        _merge(data, {field: given} if given else {})
        if args.seed is not None and "seed" in {f.name for f in dataclasses.fields(cls)}:
            data["seed"] = args.seed
    if name == "decontaminate" and args.eval:
        data["eval_sets"] = [_eval_set(item) for item in args.eval]
    return build_settings(cls, data, name)


def _merge(target: dict[str, Any], updates: dict[str, Any]) -> None:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _eval_set(item: str) -> dict[str, Any]:
    # "PATH:FIELDS" splits at the last colon only when what follows looks like field names (Windows drive letters
    # and paths with colons stay whole).
    path, sep, fields = item.rpartition(":")
    if sep and fields and all(f.strip().isidentifier() for f in fields.split(",")) and path:
        return {"path": path, "fields": [f.strip() for f in fields.split(",")]}
    return {"path": item}


def _roles(args: argparse.Namespace, base: StageConfig | None) -> dict[str, ModelSpec | None]:
    name = args.stage
    roles: dict[str, ModelSpec | None] = dict(base.models) if base else {}
    for role in STAGE_DEFS[name].roles:
        flag_value = getattr(args, f"role_{role}", None)
        if flag_value:
            roles[role] = ModelSpec.parse(flag_value, SPEC_OPTIONS[name][role])
    main = MAIN_ROLE.get(name)
    if main:
        spec = _main_spec(args)
        if spec is not None:
            roles[main] = spec
    for role, default in STAGE_DEFS[name].roles.items():
        if roles.get(role) is None and default not in (REQUIRED, OPTIONAL) and not default.startswith("stage:"):
            roles[role] = ModelSpec.parse(default, role)
    for role, spec in roles.items():
        if spec is not None and spec.backend == "stage":
            flag = SPEC_OPTIONS.get(name, {}).get(role, "--spec")
            raise ConfigError(f"{name}: the {role} is 'stage:{spec.model}', which only the pipeline can resolve; "
                              f"give the model folder with {flag}")  # fmt: skip
    missing = [r for r, d in STAGE_DEFS[name].roles.items() if roles.get(r) is None and d != OPTIONAL]
    if missing:
        raise ConfigError(f"{name}: no model for {', '.join(missing)}; {_how_to_give(name, missing)}")
    return roles


def _how_to_give(name: str, roles: list[str]) -> str:
    flags = [SPEC_OPTIONS.get(name, {}).get(r) or "--spec or --base-url/--model, --local-model, --vllm-model"
             for r in roles]  # fmt: skip
    return "give " + "; ".join(flags)


def _main_spec(args: argparse.Namespace) -> ModelSpec | None:
    """The main role's model from ``--spec`` or the shared backend options (None when neither is given)."""
    from ...generation.factory import BASE_URL_ENV, MODEL_ENV

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
        raise ConfigError(f"choose one model for the {MAIN_ROLE[args.stage]}, got {' and '.join(chosen)}")
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
        import dataclasses

        spec = dataclasses.replace(spec, tokenizer=args.spec_tokenizer)
    return spec


def _read_yaml_file(path: str | None) -> Any:
    if not path:
        return None
    from .config import read_yaml

    return read_yaml(Path(path).read_text(encoding="utf-8"))


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone ``swift-study``-like parser holding only the ``scalequest`` command."""
    parser = argparse.ArgumentParser(prog="swift-study")
    add_scalequest_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``scalequest`` commands: ``python -m swift_callbacks.builders.scalequest run --config ...``."""
    args = build_parser().parse_args(["scalequest", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
