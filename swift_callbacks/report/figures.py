"""Study curves over training steps, drawn like the swift-study paper's Figures 1-3."""

from __future__ import annotations

import os

import pandas as pd

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
