"""``swift-study demo``: the argument parser (cheap to import: argparse only)."""

from __future__ import annotations

import argparse


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``demo`` on ``swift-study``'s subparsers; returns its parser."""
    parser = subparsers.add_parser(
        "demo", help="run a complete CoT swift study offline (tiny model on a CPU, or --model)"
    )
    parser.add_argument("--output-dir", required=True, help="where the runs, their influence history and figure go")
    parser.add_argument(
        "--model", default=None,
        help="a Hub id, local folder or .gguf file of a causal LM (default: an offline tiny model, warmed up first)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from .run import DemoConfig, run_demo

    run_demo(DemoConfig(output_dir=args.output_dir, model=args.model, seed=args.seed))
    return 0
