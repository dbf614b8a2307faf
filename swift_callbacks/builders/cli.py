"""``swift-study build ...``: the command-line face of the builders.

The top-level CLI adds this with ``add_build_parser(subparsers)``; the parser's ``func`` runs the build.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..configuration import positive_int
from ..errors import UserError
from .build import DEFAULT_SAMPLING, KINDS, run_build, summary_lines
from .records import FORMATS
from .templating import LANGS

EPILOG = """\
inputs: --input is a .jsonl/.json/.csv/.tsv/.parquet file or a hub dataset id (with --split, --config).
fields read (rename with --map FIELD=COLUMN[,FIELD=COLUMN]; COLUMN may join several with '+'):
  cot, clarify, similar   query, response, [task], [id]
  evaluate                query, response, [negative_response], [label pos/neg], [task], [id]
                          (query/response also from TRL rows: prompt/completion, text or chat, or messages)
  rules-extract           text, [id]
  rules-apply             question, choices, answer (index or letter), [subject -> task], [id]
outputs: --output FILE.jsonl (rules-apply: FILE.<rule>.jsonl per rule; rules-extract: a rules YAML);
rejected rows go to FILE.rejects.jsonl with a reason. Every answer is cached (--cache-dir), so rerunning a
crashed or partial build sends only what is missing.
"""


def add_build_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``build`` command to a ``swift-study`` sub-command set.

    Args:
        subparsers: What ``parser.add_subparsers()`` returned.

    Returns:
        The ``build`` parser (its ``func`` default runs the build and returns an exit code).
    """
    from ..generation.factory import add_backend_arguments

    parser = subparsers.add_parser(
        "build",
        help="build probe/training sets with the data strategies and rules (CoT, clarify, evaluate, ...)",
        description="Build SFT datasets from reference examples with an LLM generator.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=KINDS, help="what to build")
    _add_data_arguments(parser.add_argument_group("data"))
    _add_template_arguments(parser.add_argument_group("templates and rules"))
    add_backend_arguments(parser)
    parser.set_defaults(func=run_from_args)
    return parser


def _add_data_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--input", required=True, help="input file or hub dataset id")
    group.add_argument("--output", help="output file (required unless --dry-run)")
    group.add_argument("--map", action="append", metavar="FIELD=COLUMN,...", help="column mapping (repeatable)")
    group.add_argument("--split", default=None, help="hub dataset split (default: train)")
    group.add_argument("--config", default=None, help="hub dataset configuration")
    group.add_argument("--format", dest="fmt", choices=FORMATS, default="prompt-completion", help="TRL output format")
    group.add_argument("--limit", type=positive_int, default=None, metavar="N", help="read only the first N rows")
    group.add_argument("--dry-run", action="store_true", help="print the requests it would send; send nothing")


def _add_template_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--lang", choices=LANGS, default="en", help="template language (default: en)")
    group.add_argument("--templates", metavar="FILE", help="YAML overriding template fields per builder")
    group.add_argument("--rules", action="append", metavar="FILE", help="YAML rules extending the shipped ones")
    group.add_argument("--rule", dest="rule_names", action="append", metavar="NAME",
                       help="rules-apply: use only this rule (repeatable; default: all)")  # fmt: skip
    group.add_argument("--seeds-per-request", type=positive_int, default=20, metavar="N",
                       help="rules-extract: seed questions per request (default: 20)")  # fmt: skip


def run_from_args(args: argparse.Namespace) -> int:
    """Runs ``swift-study build`` from parsed arguments and prints the summary.

    Returns:
        0 on success; 1 when input rows produced no output row; 2 on a usage or configuration error.
    """
    from ..generation.factory import backend_from_args, sampling_from_args

    if not args.dry_run and not args.output:
        raise UserError("--output is required (or use --dry-run)")
    if args.output and Path(args.output).is_dir():
        raise UserError(f"--output {args.output!r} is a folder; give the output file (e.g. {args.output}/out.jsonl)")
    generator = None
    try:
        if not args.dry_run:
            from ..generation.runner import Generator

            generator = Generator(backend_from_args(args), args.cache_dir, desc=f"build {args.kind}")
        result = run_build(
            args.kind, args.input, args.output, generator=generator,
            params=sampling_from_args(args, DEFAULT_SAMPLING[args.kind]), lang=args.lang, templates=args.templates,
            rules=args.rules, rule_names=args.rule_names, mapping=args.map, split=args.split, config=args.config,
            fmt=args.fmt, limit=args.limit, seeds_per_request=args.seeds_per_request, dry_run=args.dry_run,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as err:  # configuration problems, all found before anything is sent
        raise UserError(str(err)) from err
    finally:
        if generator is not None:
            generator.close()
    print("\n".join([f"swift-study build {args.kind}:", *summary_lines(result)]))
    if args.dry_run and not result.stats.requests:
        print("dry run: no request would be sent (every row was rejected; see the reasons above)", file=sys.stderr)
        return 1
    return 1 if not args.dry_run and result.stats.rows_in and not result.stats.rows_out else 0
