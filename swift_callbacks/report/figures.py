"""Study curves over training steps, drawn like the swift-study paper's Figures 1-3, and diagnostic scatters.

``plot_panels`` draws a study's in-task and cross-task panels (``study_panels``) with their 95% bootstrap bands,
for the report and the demo; ``plot_metrics`` is a single-panel figure straight from ``load_metrics`` (normal 95%
bands), ``summary_table`` its table, ``plot_diagnostics`` the report's scatters. Every curve figure says in its
caption what its band is and keeps each panel readable: a far outlying point is marked at the axis edge with its
value instead of setting the scale (``FENCE_IQR``). Matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from .history import Curve, History, StudyView

# Solid lines for strategy probes, dashed for the plain-QA baselines, as in the paper's figures.
_BASELINES = ("non-CoT", "Pos →")


def plot_metrics(pairs: pd.DataFrame, metrics: pd.DataFrame, path: str | os.PathLike, title: str = "") -> None:
    """Plot every study metric (s_in / s_cross of a probe set on an eval set) against the training step.

    Args:
        pairs: ``load_pairs(out)``, used for a 95% band (±1.96 standard errors over pairs) around each curve; the
            caption says so, and a far outlying point is marked at the axis edge (see :func:`plot_panels`).
        metrics: ``load_metrics(out)`` (one row per step and metric).
        path: PNG file to write.
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from ..store import scores_from_pairs

    scores = scores_from_pairs(pairs)
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=120)
    drawn = []
    for label, curve in metrics.groupby("metric", sort=False):
        curve = curve.sort_values("step")
        spec = curve.iloc[0]
        block = scores[(scores.probe_set == spec.probe_set) & (scores.eval_set == spec.eval_set)].sort_values("step")
        sem = block[f"s_{spec.context}_sem"].fillna(0.0).to_numpy()
        style = "--" if label.startswith(_BASELINES) else "-"
        (line,) = ax.plot(curve.step, curve.value, style, marker="o", markersize=3, label=label)
        mean = block[f"s_{spec.context}"].to_numpy()
        ax.fill_between(block.step, mean - 1.96 * sem, mean + 1.96 * sem, color=line.get_color(), alpha=0.12,
                        linewidth=0)  # fmt: skip
        drawn.append((_Drawn(curve.step.to_numpy(), curve.value.to_numpy(), mean - 1.96 * sem, mean + 1.96 * sem),
                      line.get_color()))  # fmt: skip
    ax.axhline(0.0, color="grey", linewidth=0.6)
    _readable_limits(ax, drawn)
    ax.set_xlabel("training step")
    ax.set_ylabel("average RelInf")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend([*handles, Patch(color="grey", alpha=0.25, linewidth=0)], [*labels, "shaded: mean ± 1.96 SE over pairs"],
              fontsize=8)  # fmt: skip
    ax.grid(alpha=0.3)
    fig.text(0.5, 0.0, f"Shaded: mean ± 1.96 standard errors over pairs (a normal 95% interval); {FENCE_TEXT}.",
             ha="center", va="top", fontsize=7, wrap=True)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


class _Drawn(NamedTuple):
    """A drawn curve as :func:`_readable_limits` reads it (the fields of ``history.Curve`` it uses)."""

    steps: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


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


BAND_TEXT = "shaded: 95% interval of the mean over pairs (percentile bootstrap, pairs resampled)"
"""What the shaded band of a report curve is (``history.Curve.lo`` / ``hi``); legend and caption say so."""
# Tukey's "far out" fence: a point more than this many interquartile ranges beyond the quartiles of a panel's
# plotted means is left outside the axis (drawn at the edge as a marker with its value), so one spike (e.g. a
# collapsed evaluation gradient) cannot squash the other curves of the panel.
FENCE_IQR = 3.0
FENCE_TEXT = (
    f"a point beyond {FENCE_IQR:g} interquartile ranges of the plotted means is drawn at the axis edge as ▲/▼ with "
    "its value"
)
CLIP_TEXT = f"Each panel has its own y scale; in a panel, {FENCE_TEXT}."


PANEL_TEXT = {
    "in": ("(a) in-task context", "s_in: mean RelInf over in-task pairs"),
    "cross": ("(b) cross-task context", "s_cross: mean RelInf over cross-task pairs"),
}


def study_panels(history: History, view: StudyView) -> list[tuple[str, str, list[tuple[Curve, bool]]]]:
    """The in-task and cross-task panels of one study (strategy and baseline curves), for :func:`plot_panels`."""
    panels = []
    for context, (panel_title, ylabel) in PANEL_TEXT.items():
        metrics = [m for m in view.metrics if m.context == context]
        if metrics:
            curves = [
                (history.curve(m.probe_set, m.eval_set, m.context, m.label), view.is_baseline(m)) for m in metrics
            ]
            panels.append((panel_title, ylabel, curves))
    return panels


def plot_panels(
    panels: Sequence[tuple[str, str, Sequence[tuple[Curve, bool]]]],
    path: str | os.PathLike,
    title: str,
    band_text: str = BAND_TEXT,
):
    """Side-by-side panels of curves over training steps, each with its 95% bootstrap band.

    Every panel gets its own y scale. A point far outside the rest of its panel (beyond ``FENCE_IQR`` interquartile
    ranges of the panel's plotted means) is left outside the axis and marked at the edge with its value, so one
    outlying curve keeps the others readable; the caption under the figure says what the band is and this rule.

    Args:
        panels: ``(panel title, y label, [(curve, is_baseline), ...])`` per panel. Baseline curves are dashed,
            strategy curves solid, as in the paper's Figures 1-3.
        path: PNG file to write.
        title: Figure title.
        band_text: What the shaded band is (legend entry and caption).

    Returns:
        The matplotlib ``Figure`` (already saved).
    """
    from matplotlib.patches import Patch

    colors: dict[tuple[str, str], str] = {}
    fig = _figure(6.2 * len(panels), 5.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel_title, ylabel, curves) in zip(axes, panels, strict=True):
        for curve, baseline in curves:
            color = colors.setdefault((curve.probe_set, curve.eval_set), _PALETTE[len(colors) % len(_PALETTE)])
            _draw_curve(ax, curve, color, "--" if baseline else "-")
        _dress(ax, panel_title, ylabel)
        _readable_limits(ax, [(c, colors[(c.probe_set, c.eval_set)]) for c, _ in curves])
        steps = {float(x) for curve, _ in curves for x in curve.steps}
        if len(steps) == 1:  # a single checkpoint: centre it rather than let the locator invent fractional steps
            (only,) = steps
            ax.set_xlim(only - 1, only + 1)
            ax.set_xticks([only])
        if curves:
            handles, labels = ax.get_legend_handles_labels()
            handles.append(Patch(color="grey", alpha=0.25, linewidth=0))
            labels.append(band_text.split(" (")[0])
            ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2 if len(curves) > 3
                      else 1, fontsize=8, frameon=False)  # fmt: skip
    fig.suptitle(title, fontsize=12)
    _caption(fig, axes, f"{band_text[0].upper()}{band_text[1:]}. {CLIP_TEXT}")
    fig.savefig(path, bbox_inches="tight")
    return fig


def _caption(fig, axes, text: str) -> None:
    """``text`` under the figure, below the legends under the panels, wrapped to the figure's width."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()  # legend extents are known only to a renderer
    fig.subplots_adjust()
    boxes = [ax.get_legend() or ax.xaxis.label for ax in axes]
    bottom = min(box.get_window_extent(renderer).y0 for box in boxes)
    y = fig.transFigure.inverted().transform((0.0, bottom))[1] - 0.015
    width = int(fig.get_figwidth() * 15)  # characters of 8-point text per inch, roughly
    fig.text(0.5, y, textwrap.fill(text, width), ha="center", va="top", fontsize=8)


def _draw_curve(ax, curve: Curve, color: str, style: str) -> None:
    # A block without pairs of this context (e.g. no shared task) still gets its legend entry, marked as such.
    label = curve.label if curve.steps.size else f"{curve.label} (no pairs)"
    ax.fill_between(curve.steps, curve.lo, curve.hi, color=color, alpha=0.16, linewidth=0)
    ax.plot(curve.steps, curve.mean, style, color=color, marker="o", markersize=3, linewidth=1.6, label=label)


def fence(values: np.ndarray) -> tuple[float, float] | None:
    """The ``FENCE_IQR`` fence of ``values`` (finite ones), or None when no value lies beyond it."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 4:
        return None
    q1, q3 = np.quantile(v, [0.25, 0.75])
    low, high = q1 - FENCE_IQR * (q3 - q1), q3 + FENCE_IQR * (q3 - q1)
    return (float(low), float(high)) if (v < low).any() or (v > high).any() else None


def _readable_limits(ax, curves: Sequence[tuple[Curve, str]]) -> None:
    """Clip the y axis to the fence of the panel's means (if any point lies beyond) and mark the points outside."""
    means = np.concatenate([c.mean for c, _ in curves]) if curves else np.empty(0)
    limits = fence(means)
    if limits is None:
        return
    low, high = limits
    inside = means[(means >= low) & (means <= high)]
    bands = np.concatenate([np.r_[c.lo, c.hi] for c, _ in curves])
    bands = bands[np.isfinite(bands) & (bands >= low) & (bands <= high)]
    shown = np.r_[inside, bands, 0.0]
    pad = 0.08 * max(float(np.ptp(shown)), 1e-12)
    bottom, top = float(shown.min()) - pad, float(shown.max()) + pad
    ax.set_ylim(bottom, top)
    for curve, color in curves:
        for step, value in zip(curve.steps, curve.mean, strict=True):
            if value > top or value < bottom:
                edge, marker, va = (top, "^", "top") if value > top else (bottom, "v", "bottom")
                ax.plot([step], [edge], marker=marker, color=color, markersize=9, clip_on=False, linestyle="none")
                ax.annotate(f"{value:+.3g}", (step, edge), textcoords="offset points", xytext=(6, 0), va=va,
                            fontsize=8, color=color)  # fmt: skip


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
