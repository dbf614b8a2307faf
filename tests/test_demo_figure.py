"""The study figure says what its bands are and keeps every curve readable when one curve spikes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from swift_callbacks.report.figures import BAND_TEXT, FENCE_IQR, fence, plot_panels, study_panels
from swift_callbacks.report.history import load_history, study_views
from swift_callbacks.store import PAIR_COLUMNS, InfluenceStore

STEPS = [0, 10, 20, 30]
TASKS = [f"t{i}" for i in range(6)]
# Block means by step: CoT's in-task curve spikes to +40 at step 20 (a collapsed evaluation gradient does this).
MEANS = {
    ("cot", True): [0.30, 0.40, 40.0, 0.50],
    ("noncot", True): [0.10, 0.15, 0.20, 0.25],
    ("cot", False): [0.05, 0.06, 0.08, 0.07],
    ("noncot", False): [0.01, 0.02, 0.01, 0.02],
}
METRICS = {
    "CoT → In-task non-CoT": ("cot", "in"),
    "non-CoT → In-task non-CoT": ("noncot", "in"),
    "CoT → Cross-task non-CoT": ("cot", "cross"),
    "non-CoT → Cross-task non-CoT": ("noncot", "cross"),
}


def _pairs(step_index: int, step: int) -> pd.DataFrame:
    rng = np.random.default_rng(step)
    rows = []
    for probe_set in ("cot", "noncot"):
        for p in TASKS:
            for e in TASKS:
                mean = MEANS[(probe_set, p == e)][step_index]
                r = mean * (1.0 + 0.1 * rng.standard_normal())  # some spread: bands of non-zero width
                rows.append({
                    "step": step, "probe_set": probe_set, "probe_id": f"{probe_set}-{p}", "probe_task": p,
                    "eval_set": "noncot_similar", "eval_id": f"sim-{e}", "eval_task": e, "paired": p == e,
                    "dot": r, "eval_sq_norm": 1.0, "relinf": r, "probe_sq_norm": 1.0, "cosine": r,
                    "probe_tokens": 20 if probe_set == "cot" else 3, "eval_tokens": 3, "probe_loss": 1.0,
                    "eval_loss": 1.0,
                })  # fmt: skip
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


@pytest.fixture(scope="module")
def figure(tmp_path_factory):
    out = tmp_path_factory.mktemp("spiky")
    store = InfluenceStore(out)
    for i, step in enumerate(STEPS):
        store.write_step(step, _pairs(i, step))
    specs = {label: {"study": "cot", "probe_set": p, "eval_set": "noncot_similar", "context": c}
             for label, (p, c) in METRICS.items()}  # fmt: skip
    store.write_metrics(specs)
    history = load_history(out, resamples=200)
    (view,) = study_views(history)
    path = out / "study.png"
    fig = plot_panels(study_panels(history, view), path, "spiky")
    assert path.stat().st_size > 10_000
    return fig, history


def test_one_spiking_curve_does_not_squash_the_others(figure):
    fig, history = figure
    in_task, cross = fig.axes[:2]
    bottom, top = in_task.get_ylim()
    others = [*MEANS[("noncot", True)], *(v for v in MEANS[("cot", True)] if v < 1)]
    assert bottom <= min(others) and max(others) <= top < 2.0  # the spike (+40) is not on the scale
    assert (max(others) - min(others)) / (top - bottom) > 0.3  # the other curves fill a readable part of the panel
    markers = [line for line in in_task.lines if line.get_marker() == "^"]
    assert len(markers) == 1 and markers[0].get_xdata()[0] == 20 and markers[0].get_ydata()[0] == top
    spike = history.curve("cot", "noncot_similar", "in").mean[2]
    assert [t.get_text() for t in in_task.texts] == [f"{spike:+.3g}"]  # its value is written beside the marker
    # No outlier in the cross-task panel: its own scale holds every mean and band, nothing marked.
    low, high = cross.get_ylim()
    for probe_set in ("cot", "noncot"):
        curve = history.curve(probe_set, "noncot_similar", "cross")
        assert low <= curve.lo.min() and curve.hi.max() <= high
    assert not [line for line in cross.lines if line.get_marker() in ("^", "v")] and not cross.texts


def test_the_figure_says_what_the_band_is(figure):
    fig, _ = figure
    for ax in fig.axes[:2]:
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "shaded: 95% interval of the mean over pairs" in legend
        assert "CoT → In-task non-CoT" in legend or "CoT → Cross-task non-CoT" in legend
    caption = " ".join(t.get_text() for t in fig.texts)
    assert BAND_TEXT[1:] in caption and "bootstrap" in caption
    assert f"{FENCE_IQR:g} interquartile ranges" in caption and "▲/▼" in caption


def test_fence_leaves_out_only_far_points():
    assert fence(np.array([0.1, 0.2, 0.3, 0.4, 0.5])) is None  # nothing to leave out: the full range is shown
    low, high = fence(np.array([0.1, 0.2, 0.3, 0.4, 40.0]))
    assert low < 0.1 and 0.4 < high < 40.0
    assert fence(np.array([1.0, np.nan, 2.0])) is None  # too few points to call one an outlier
