"""Figures and summaries that read only the influence store."""

from .figures import plot_metrics, summary_table

__all__ = ["plot_metrics", "summary_table"]
