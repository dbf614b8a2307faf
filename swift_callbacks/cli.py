"""``swift-study`` command line: a thin layer over the package."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import DemoConfig, run_demo

    run_demo(DemoConfig(output_dir=args.output_dir, model=args.model, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swift-study", description="Swift-study influence tracking for SFT runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a complete CoT swift study offline (tiny model, CPU, a few minutes)")
    demo.add_argument("--output-dir", required=True, help="where the run, its influence history and figure go")
    demo.add_argument("--model", default=None, help="local path or Hub id of a causal LM (default: a tiny model)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    from .builders.cli import add_build_parser
    from .builders.scalequest.cli import add_scalequest_parser
    from .report.cli import add_report_parser
    from .scoring import add_score_parser
    from .training.train import add_train_parser

    add_build_parser(sub)
    add_scalequest_parser(sub)
    add_train_parser(sub)
    add_score_parser(sub)
    add_report_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
