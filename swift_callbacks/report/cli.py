"""``swift-study report OUTPUT_DIR [--format md|html] [--out PATH]``: the argument parser and its handler.

Importing this module is cheap (argparse only), so the ``swift-study`` entry point can register the command
without loading pandas, matplotlib or torch.
"""

from __future__ import annotations

import argparse

from ..configuration import positive_int


def add_report_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``report`` command on ``swift-study``'s sub-command parsers; returns its parser."""
    parser = subparsers.add_parser(
        "report",
        help="figures, verdicts and diagnostics of a run's influence history (Markdown or one HTML file)",
        description="Report a run's influence history: per study, figures like the swift-study paper's Figures "
        "1-3 with 95% bootstrap bands, a verdict table per strategy against its plain-QA baseline, robust "
        "statistics by step (median, trimmed mean, cosine, collapsed evaluation gradients) and length / "
        "gradient-norm / cosine diagnostics.",
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="training output_dir holding swift_influence/")
    parser.add_argument(
        "--format",
        dest="fmt",
        choices=("md", "html"),
        default=None,
        help="md: report.md with PNG files beside it; html: one self-contained file (default: from --output's "
        "suffix, else md)",
    )
    parser.add_argument(
        "--output", "--out", dest="out", default=None, metavar="PATH",
        help="report file (default: OUTPUT_DIR/report/report.md or .html)",
    )  # fmt: skip
    parser.add_argument("--resamples", type=positive_int, default=1000, help="bootstrap resamples per band point")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")  # fmt: skip
    parser.set_defaults(func=run_report)
    return parser


def run_report(args: argparse.Namespace) -> int:
    """Build the report and print its path (a missing or empty history is a ``ReportError``: exit 2)."""
    from .build import build_report

    fmt = args.fmt or ("html" if args.out and str(args.out).lower().endswith((".html", ".htm")) else "md")
    print(build_report(args.output_dir, fmt=fmt, out=args.out, resamples=args.resamples, seed=args.seed))
    return 0
