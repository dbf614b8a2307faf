"""``swift-study``: one command table, one error policy.

Every command is a row of :data:`COMMANDS`: its name and the function that adds its parser (imported only when
the parser is built, so ``swift-study --help`` loads no torch). Each parser sets ``func``, which runs the command
and returns an exit status; :func:`main` runs it through :func:`swift_callbacks.errors.run_command`: a user error
(bad config, set, file, model or history) prints one line and exits 2, whatever the command.

Option names are shared: ``--output`` names an output file, ``--output-dir`` an output folder, ``--config`` a
YAML config, ``--set KEY.PATH=VALUE`` overrides one of its values (``[i]`` indexes lists), ``--model`` a model.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata

from .errors import run_command

COMMANDS: dict[str, str] = {
    "demo": "swift_callbacks.demo.cli:add_demo_parser",
    "train": "swift_callbacks.training.train:add_train_parser",
    "score": "swift_callbacks.scoring:add_score_parser",
    "report": "swift_callbacks.report.cli:add_report_parser",
    "evaluate": "swift_callbacks.evaluation.cli:add_evaluate_parser",
    "validate": "swift_callbacks.validation.cli:add_validate_parser",
    "build": "swift_callbacks.builders.cli:add_build_parser",
    "scalequest": "swift_callbacks.builders.scalequest.cli:add_scalequest_parser",
}
"""``{command: "module:function"}``; the function adds the command's parser to ``swift-study``'s subparsers."""


def version() -> str:
    try:
        return metadata.version("swift-callbacks")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swift-study", description="Swift-study influence tracking for SFT runs.")
    parser.add_argument("--version", action="version", version=f"swift-study {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for target in COMMANDS.values():
        module, _, function = target.partition(":")
        getattr(importlib.import_module(module), function)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"swift-study {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
