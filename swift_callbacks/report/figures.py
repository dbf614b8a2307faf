"""Study curves over training steps, drawn like the swift-study paper's Figures 1-3, and diagnostic scatters.

``plot_metrics`` / ``summary_table`` are the demo's single-panel figure and table; ``plot_panels`` (in-task and
cross-task panels with bootstrap bands) and ``plot_diagnostics`` are the report's. Matplotlib is imported only
when a figure is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from .history import Curve

# Solid lines for strategy probes, dashed for the plain-QA baselines, as in the paper's figures.
_BASELINES = ("non-CoT", "Pos →")


def plot_metrics(pairs: pd.DataFrame, metrics: pd.DataFrame, path: str | os.PathLike, title: str = "") -> None:
    """Plot every study metric (s_in / s_cross of a probe set on an eval set) against the training step.

    Args:
        pairs: ``load_pairs(out)``, used for a 95% band (±1.96 standard errors over pairs) around each curve.
        metrics: ``load_metrics(out)`` (one row per step and metric).
        path: PNG file to write.
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..store import scores_from_pairs

    scores = scores_from_pairs(pairs)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, curve in metrics.groupby("metric", sort=False):
        curve = curve.sort_values("step")
        spec = curve.iloc[0]
        block = scores[(scores.probe_set == spec.probe_set) & (scores.eval_set == spec.eval_set)].sort_values("step")
        sem = block[f"s_{spec.context}_sem"].fillna(0.0).to_numpy()
        style = "--" if label.startswith(_BASELINES) else "-"
        (line,) = ax.plot(curve.step, curve.value, style, marker="o", markersize=3, label=label)
        ax.fill_between(block.step, block[f"s_{spec.context}"] - 1.96 * sem, block[f"s_{spec.context}"] + 1.96 * sem,
                        color=line.get_color(), alpha=0.12, linewidth=0)  # fmt: skip
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_xlabel("training step")
    ax.set_ylabel("average RelInf")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per metric: first, last, mean and min/max value over the recorded steps."""
    grouped = metrics.sort_values("step").groupby("metric", sort=False)["value"]
    table = pd.DataFrame({
        "first": grouped.first(), "last": grouped.last(), "mean": grouped.mean(),
        "min": grouped.min(), "max": grouped.max(), "steps": grouped.count(),
    })  # fmt: skip
    return table


# ---- report figures (no pyplot: a bare Figure renders with Agg and never switches the caller's backend) --------

# Colours keyed by block, so a probe set x eval set keeps its colour in the in-task and cross-task panels.
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f"]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def plot_panels(
    panels: Sequence[tuple[str, str, Sequence[tuple[Curve, bool]]]], path: str | os.PathLike, title: str
) -> None:
    """Side-by-side panels of curves over training steps, each with its 95% bootstrap band.

    Args:
        panels: ``(panel title, y label, [(curve, is_baseline), ...])`` per panel. Baseline curves are dashed,
            strategy curves solid, as in the paper's Figures 1-3.
        path: PNG file to write.
        title: Figure title.
    """
    colors: dict[tuple[str, str], str] = {}
    fig = _figure(6.2 * len(panels), 5.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel_title, ylabel, curves) in zip(axes, panels, strict=True):
        for curve, baseline in curves:
            color = colors.setdefault((curve.probe_set, curve.eval_set), _PALETTE[len(colors) % len(_PALETTE)])
            _draw_curve(ax, curve, color, "--" if baseline else "-")
        _dress(ax, panel_title, ylabel)
        steps = {float(x) for curve, _ in curves for x in curve.steps}
        if len(steps) == 1:  # a single checkpoint: centre it rather than let the locator invent fractional steps
            (only,) = steps
            ax.set_xlim(only - 1, only + 1)
            ax.set_xticks([only])
        if curves:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2 if len(curves) > 3 else 1, fontsize=8,
                      frameon=False)  # fmt: skip
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, bbox_inches="tight")


def _draw_curve(ax, curve: Curve, color: str, style: str) -> None:
    # A block without pairs of this context (e.g. no shared task) still gets its legend entry, marked as such.
    label = curve.label if curve.steps.size else f"{curve.label} (no pairs)"
    ax.fill_between(curve.steps, curve.lo, curve.hi, color=color, alpha=0.16, linewidth=0)
    ax.plot(curve.steps, curve.mean, style, color=color, marker="o", markersize=3, linewidth=1.6, label=label)


def _dress(ax, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are integers, even with one checkpoint
    ax.axhline(0.0, color="grey", linewidth=0.7)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_diagnostics(probes: pd.DataFrame, pairs: pd.DataFrame, path: str | os.PathLike, title: str) -> None:
    """Four scatter panels for one evaluation set, coloured by probe set.

    (a) completion tokens vs mean RelInf and (b) gradient norm vs mean RelInf, one point per probe example;
    (c) tokens vs gradient norm; (d) cosine vs RelInf, one point per pair at the last recorded step (filled:
    in-task, hollow: cross-task).

    Args:
        probes: Rows of ``diagnostics.probe_table`` for this evaluation set.
        pairs: The pairs of this evaluation set at the step to show in panel (d).
        path: PNG file to write.
        title: Figure title.
    """
    fig = _figure(11.5, 8.6)
    (a, b), (c, d) = fig.subplots(2, 2)
    for i, (probe_set, rows) in enumerate(probes.groupby("probe_set", sort=False)):
        color = _PALETTE[i % len(_PALETTE)]
        a.scatter(rows.tokens, rows.relinf, s=22, color=color, alpha=0.8, label=probe_set)
        b.scatter(rows.grad_norm, rows.relinf, s=22, color=color, alpha=0.8)
        c.scatter(rows.tokens, rows.grad_norm, s=22, color=color, alpha=0.8)
        sel = pairs[pairs.probe_set == probe_set]
        for paired, face in ((True, color), (False, "none")):
            part = sel[sel.paired == paired]
            d.scatter(part.cosine, part.relinf, s=12, facecolors=face, edgecolors=color, alpha=0.6, linewidths=0.8)
    for ax, (xl, yl, t) in zip((a, b, c, d), _DIAG_AXES, strict=True):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(t, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in (a, b, d):
        ax.axhline(0.0, color="grey", linewidth=0.7)
    d.axvline(0.0, color="grey", linewidth=0.7)
    # RelInf = cosine x |∇z|/|∇z0|: on this line the norms are equal; far above it, RelInf is gradient size.
    d.axline((0.0, 0.0), slope=1.0, color="grey", linestyle=":", linewidth=1.0, label="RelInf = cosine (equal norms)")
    d.legend(loc="best", fontsize=8, frameon=False)
    fig.legend(*a.get_legend_handles_labels(), loc="lower center", ncol=min(6, max(1, len(a.collections))),
               bbox_to_anchor=(0.5, -0.01), frameon=False, title="probe set")  # fmt: skip
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, bbox_inches="tight")


_DIAG_AXES = [
    ("completion tokens", "mean RelInf", "(a) length vs RelInf, per probe"),
    ("gradient norm |∇ℓ(z)|", "mean RelInf", "(b) gradient norm vs RelInf, per probe"),
    ("completion tokens", "gradient norm |∇ℓ(z)|", "(c) length vs gradient norm, per probe"),
    ("cosine(∇z, ∇z0)", "RelInf", "(d) RelInf vs cosine, per pair, last step (filled: in-task)"),
]
