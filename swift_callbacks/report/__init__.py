"""Figures, verdicts and diagnostics that read only the influence store.

Public API::

    from swift_callbacks.report import build_report, add_report_parser

    build_report("out")                 # out/report/report.md + PNG figures
    build_report("out", fmt="html")     # out/report/report.html, one self-contained file
    analyse("out").verdicts             # the numbers alone, no figure drawn

Names are imported lazily: the package imports without pandas, matplotlib or torch, so ``swift-study`` can
register the ``report`` command for free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "Analysis": "build",
    "ReportError": "history",
    "analyse": "build",
    "add_report_parser": "cli",
    "build_report": "build",
    "plot_diagnostics": "figures",
    "plot_metrics": "figures",
    "plot_panels": "figures",
    "summary_table": "figures",
}

__all__ = [
    "Analysis",
    "ReportError",
    "add_report_parser",
    "analyse",
    "build_report",
    "plot_diagnostics",
    "plot_metrics",
    "plot_panels",
    "summary_table",
]

if TYPE_CHECKING:
    from .build import Analysis, analyse, build_report
    from .cli import add_report_parser
    from .figures import plot_diagnostics, plot_metrics, plot_panels, summary_table
    from .history import ReportError


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
