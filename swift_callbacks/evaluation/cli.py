"""``swift-study evaluate``: accuracy of models, checkpoints or whole runs on evaluation sets, with intervals."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..configuration import ConfigError, add_override_argument, load_yaml, positive_int
from .config import evaluate_config

EXAMPLE = """example:
  swift-study evaluate --model out/run --eval-set gsm8k=data/gsm8k_test.jsonl --output-dir out/eval
  swift-study evaluate --config eval.yaml --set batch_size=16"""


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``evaluate`` to ``swift-study``'s subparsers."""
    parser = subparsers.add_parser(
        "evaluate", help="accuracy of a model, a checkpoint or every checkpoint of a run, with bootstrap intervals",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--config", help="evaluate YAML (models, sets, output_dir, judge, ...)")
    add_override_argument(parser, "batch_size=16")
    parser.add_argument("--model", dest="models", action="append", metavar="SPEC_OR_FOLDER",
                        help="a model spec, checkpoint folder or run folder (repeatable)")  # fmt: skip
    parser.add_argument("--eval-set", dest="sets", action="append", metavar="NAME=PATH",
                        help="an evaluation set file (repeatable); scored with --metric")  # fmt: skip
    parser.add_argument("--metric", default="exact_match", help="metric of the --eval-set files (default: %(default)s)")
    parser.add_argument("--output-dir", help="where records and results.csv go (a rerun resumes there)")
    parser.add_argument("--base-model", metavar="SPEC", help="the model LoRA checkpoints were trained from")
    parser.add_argument("--limit", type=positive_int, help="evaluate the first N rows of each set")
    parser.add_argument("--max-new-tokens", type=positive_int, help="generation cap (default: 64)")
    parser.add_argument(
        "--last-number", action="store_true", help="a reply without answer marker answers with its last number"
    )
    parser.add_argument("--case-sensitive", action="store_true", help="exact_match: the case of text answers counts")
    parser.add_argument("--scoring", choices=("letter", "text"),
                        help="choice: score option letters (default) or each option's own text")  # fmt: skip
    parser.add_argument("--batch-size", type=positive_int, help="prompts per batch (default: 8)")
    parser.add_argument("--judge-base-url", help="OpenAI-compatible server of the judge (metric judge)")
    parser.add_argument("--judge-model", help="the judge's model name on that server")
    parser.add_argument("--judge-api-key-env", metavar="NAME", help="environment variable with the judge's API key")
    parser.add_argument("--per-task", action="store_true", help="print accuracy per task too")
    parser.set_defaults(func=evaluate_command)
    return parser


def _config_data(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    if args.overrides and not args.config:
        raise ConfigError("--set changes a --config file; without one, give the options as flags (--batch-size, ...)")
    data: dict[str, Any] = dict(load_yaml(args.config, args.overrides)) if args.config else {}
    base_dir = Path(args.config).resolve().parent if args.config else Path.cwd()
    if args.models:
        data["models"] = args.models
    if args.sets:
        data["sets"] = [_set_entry(spec, args) for spec in args.sets]
    elif args.config and data.get("sets") and any(_set_options(args).values()):
        for entry in data["sets"]:
            entry.update(_set_options(args))
    for key, value in (("output_dir", args.output_dir), ("batch_size", args.batch_size)):
        if value is not None:
            data[key] = value
    if args.base_model:
        data["base_model"] = {"name_or_path": args.base_model}
    if args.judge_base_url or args.judge_model:
        data["judge"] = {"base_url": args.judge_base_url, "model": args.judge_model or "",
                         "api_key_env": args.judge_api_key_env}  # fmt: skip
    for key in ("models", "sets", "output_dir"):
        data.setdefault(key, None)
    return data, base_dir


def _set_entry(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).stem, spec
    return {"name": name, "path": path, "metric": args.metric, **_set_options(args)}


def _set_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {"limit": args.limit, "max_new_tokens": args.max_new_tokens, "last_number": args.last_number or None,
               "case_sensitive": args.case_sensitive or None, "scoring": args.scoring}  # fmt: skip
    return {k: v for k, v in options.items() if v is not None}


def evaluate_command(args: argparse.Namespace) -> int:
    """Run ``evaluate``; prints the accuracy table and where it was written."""
    from .run import evaluate, format_table

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    data, base_dir = _config_data(args)
    config = evaluate_config(data, base_dir=base_dir)
    results = evaluate(config)
    print(format_table(results.table, tasks=args.per_task))
    print(
        f"\nwritten: {results.output_dir / 'results.csv'} (per-example records under {results.output_dir / 'records'})"
    )
    return 0
