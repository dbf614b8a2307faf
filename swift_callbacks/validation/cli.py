"""``swift-study validate``: train the variants, evaluate them, write Table 2 and the agreement table."""

from __future__ import annotations

import argparse
import logging

from ..configuration import add_override_argument


def add_validate_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``validate`` to ``swift-study``'s subparsers."""
    parser = subparsers.add_parser(
        "validate", help="the validation study: train Base, Base+X, Base->X (seeds), evaluate, and check whether "
        "the swift verdicts predicted the accuracy changes",
    )  # fmt: skip
    parser.add_argument("--config", required=True, help="validation YAML (see recipes/*/validate*.yaml)")
    add_override_argument(parser, "seeds=[0,1,2]")
    parser.add_argument("--dry-run", action="store_true", help="print the runs it would train, and stop")
    parser.set_defaults(func=validate_command)
    return parser


def validate_command(args: argparse.Namespace) -> int:
    from .config import load_validation_config
    from .study import check_runs, markdown_table, plan, run_validation

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    config = load_validation_config(args.config, args.overrides)
    if args.dry_run:
        check_runs(config, plan(config))
        for run in plan(config):
            print(f"{run.variant.name:<24} seed {run.seed:<4} -> {run.folder}" + ("  (swift study)" * run.influence))
        return 0
    results = run_validation(config)
    level = f"{config.evaluation.confidence:.0%}"
    print(f"\nTable 2: accuracy by variant (mean over seeds), change against Base with its {level} interval")
    print(markdown_table(results.table2[results.table2.task == "all"]))
    print("Does the swift study predict it?")
    print(markdown_table(results.agreement))
    print(f"written: {results.output_dir}/table2.csv, agreement.csv (and .md)")
    return 0
