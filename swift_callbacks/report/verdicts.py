"""Verdicts: does a strategy metric beat its plain-QA baseline, stay positive, and where is it heading?

For each strategy metric of a study (e.g. ``CoT → Cross-task non-CoT``) and its baseline (the study's plain-QA
probe set on the same evaluation set in the same context: ``non-CoT → Cross-task non-CoT``), over the checkpoints
where both are recorded (n of them):

* **beats baseline**: checkpoints where the strategy is ahead beyond doubt: the 95% bootstrap interval of the
  paired difference (strategy minus baseline, paired by evaluation example, resampling the evaluation examples)
  lies above zero, with at least ``MIN_EVAL_EXAMPLES`` paired examples. **behind**: the interval lies below zero.
  Every other checkpoint is *not distinguishable*: a band that contains the baseline never "beats" it. (Without
  the pairs, e.g. for curves given directly, the strategy's own band must clear the baseline's mean.)
* **ahead from step S**: the earliest checkpoint from which the strategy beats the baseline at every later
  checkpoint (the paper's "after about 150 steps, ... consistently exceeds"); absent when it is not ahead at the end.
* **strategy > 0**: checkpoints where the strategy's own 95% band lies above zero (at least
  ``MIN_EVAL_EXAMPLES`` pairs).
* **late trend**: least-squares slope of the strategy metric over the last ceil(n/2) checkpoints (at least 2),
  and the change of the fitted line over that window (slope x window length in steps). The trend is *rising* /
  *falling* when that change is larger in size than the strategy curve's own noise (the mean half-width of its
  95% bootstrap band over the window) and the curve's last value moved the same way from the window's first;
  *flat* only for a constant window; *no clear trend* otherwise (a change within the band is not told apart from
  resampling the pairs, so it is not called flat either). No other threshold is involved.
* **mean difference**: mean of (strategy - baseline) over the checkpoints.
* **beats by cosine**: the same fraction as *beats baseline*, on the mean cosine of the same pairs. RelInf is
  cosine x |∇z| / |∇z0|, so a strategy that is ahead at a majority (> 50%) of checkpoints by RelInf but not by
  cosine wins through the size of its gradients (often its length), not their direction: the verdict says so.

The one-line verdict joins these in plain words, e.g. "beats baseline at 83% of checkpoints (5/6), ahead from
step 150 on; positive throughout; rising late", plus any diagnostic caution on the strategy's probe set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .history import Curve, PairedDifference
from .stats import late_trend

# A majority: the cosine caveat fires when RelInf is ahead at more than half of the checkpoints and cosine is not.
MAJORITY = 0.5
# Fewer paired evaluation examples (or pairs) than this at a checkpoint: not distinguishable, whatever the values.
MIN_EVAL_EXAMPLES = 3


@dataclass(frozen=True)
class Verdict:
    """The comparison of one strategy metric with its baseline (fields as in the module docstring)."""

    study: str
    strategy: str
    baseline: str
    n: int
    beats: int
    behind: int
    positive: int
    ahead_from: int | None
    late_slope: float
    late_change: float
    late_noise: float
    late_from: int | None
    trend: str
    mean_diff: float
    beats_cosine: int
    cautions: tuple[str, ...]
    text: str

    @property
    def beats_fraction(self) -> float:
        return self.beats / self.n if self.n else math.nan

    @property
    def positive_fraction(self) -> float:
        return self.positive / self.n if self.n else math.nan

    @property
    def beats_cosine_fraction(self) -> float:
        return self.beats_cosine / self.n if self.n else math.nan


def compare(
    study: str, strategy: Curve, baseline: Curve, cautions: tuple[str, ...] = (), paired: PairedDifference | None = None
) -> Verdict:
    """Apply the rules of the module docstring to a strategy curve and its baseline curve."""
    steps, s_idx, b_idx = np.intersect1d(strategy.steps, baseline.steps, return_indices=True)
    s, b = strategy.mean[s_idx], baseline.mean[b_idx]
    ok = np.isfinite(s) & np.isfinite(b)
    steps, s, b = steps[ok], s[ok], b[ok]
    enough = strategy.n_pairs[s_idx][ok] >= MIN_EVAL_EXAMPLES
    if paired is not None:
        where = np.searchsorted(paired.steps, steps)
        found = (where < paired.steps.size) & (paired.steps[np.minimum(where, paired.steps.size - 1)] == steps)
        at = np.minimum(where, max(paired.steps.size - 1, 0))
        lo = np.where(found, paired.lo[at] if paired.steps.size else np.nan, np.nan)
        hi = np.where(found, paired.hi[at] if paired.steps.size else np.nan, np.nan)
        enough_d = found & ((paired.n_eval[at] if paired.steps.size else 0) >= MIN_EVAL_EXAMPLES)
        ahead, behind = enough_d & (lo > 0), enough_d & (hi < 0)
    else:
        ahead = enough & (strategy.lo[s_idx][ok] > b)
        behind = enough & (strategy.hi[s_idx][ok] < b)
    trend = late_trend(steps, s)
    half = (strategy.hi[s_idx][ok] - strategy.lo[s_idx][ok]) / 2.0
    noise = float(np.nanmean(half[-trend.n :])) if trend.n >= 2 else math.nan
    cos_ahead = strategy.cosine[s_idx][ok] > baseline.cosine[b_idx][ok]
    fields = {
        "study": study, "strategy": strategy.label, "baseline": baseline.label, "n": int(steps.size),
        "beats": int(ahead.sum()), "behind": int(behind.sum()),
        "positive": int((enough & (strategy.lo[s_idx][ok] > 0)).sum()), "ahead_from": _ahead_from(steps, ahead),
        "late_slope": trend.slope, "late_change": trend.change, "late_noise": noise, "late_from": trend.first_step,
        "trend": _trend_word(trend.change, noise, s[-trend.n :] if trend.n >= 2 else s),
        "mean_diff": float(np.mean(s - b)) if s.size else math.nan,
        "beats_cosine": int(cos_ahead.sum()), "cautions": tuple(cautions),
    }  # fmt: skip
    return Verdict(**fields, text=_sentence(fields))


def _ahead_from(steps: np.ndarray, ahead: np.ndarray) -> int | None:
    """First step of the final run of checkpoints where the strategy is ahead (None if behind at the end)."""
    if not ahead.size or not ahead[-1]:
        return None
    behind = np.flatnonzero(~ahead)
    return int(steps[behind[-1] + 1]) if behind.size else int(steps[0])


def _trend_word(change: float, noise: float, window: np.ndarray) -> str:
    """``rising`` / ``falling`` only when the fitted change exceeds the band and the curve itself moves that way
    over the window; ``flat`` only for a constant window; ``no clear trend`` otherwise."""
    if window.size < 2 or math.isnan(change):
        return "n/a"
    if change == 0.0:
        return "flat"
    noise = 0.0 if math.isnan(noise) else noise  # a single pair per step has no band
    moved = float(window[-1] - window[0])
    if abs(change) <= noise or moved * change <= 0:
        return "no clear trend"
    return "rising" if change > 0 else "falling"


def _sentence(f: dict) -> str:
    n, k, pos, behind = f["n"], f["beats"], f["positive"], f["behind"]
    if n == 0:
        return "no checkpoint where both metrics are recorded"
    unclear = n - k - behind
    if k == n:
        parts = [f"beats baseline at every checkpoint ({k}/{n})"]
    elif k == 0 and behind == 0:
        parts = [f"not distinguishable from baseline at any checkpoint (0/{n}: the 95% intervals include it)"]
    elif k == 0:
        parts = [f"never beats baseline (0/{n} checkpoints; behind at {behind})"]
    else:
        since = f", ahead from step {f['ahead_from']} on" if f["ahead_from"] is not None else ""
        parts = [f"beats baseline at {k / n:.0%} of checkpoints ({k}/{n}){since}"]
    if 0 < k < n and unclear:
        parts[-1] += f", not distinguishable at {unclear}" + (f", behind at {behind}" if behind else "")
    if pos in (0, n):
        parts.append("positive throughout" if pos == n else "never clearly positive")
    else:
        parts.append(f"positive at {pos / n:.0%} of checkpoints")
    words = {"n/a": "too few checkpoints for a trend", "no clear trend": "no clear late trend"}
    parts.append(words.get(f["trend"], f"{f['trend']} late"))
    if k / n > MAJORITY and f["beats_cosine"] / n <= MAJORITY:
        parts.append("ahead by RelInf but not by cosine (a gradient-size effect)")
    parts += [f"caution: {c}" for c in f["cautions"]]
    return "; ".join(parts)


VERDICT_COLUMNS = [
    "study", "strategy metric", "baseline metric", "checkpoints", "beats baseline", "strategy > 0",
    "late slope /step", "late change", "late trend", "mean diff", "beats by cosine", "verdict",
]  # fmt: skip


def verdict_row(v: Verdict) -> list:
    """One row of the verdict table (columns ``VERDICT_COLUMNS``)."""
    window = f" (from step {v.late_from})" if v.late_from is not None and v.trend != "n/a" else ""
    return [
        v.study, v.strategy, v.baseline, v.n, _count(v.beats, v.n), _count(v.positive, v.n), v.late_slope,
        v.late_change, v.trend + window, v.mean_diff, _count(v.beats_cosine, v.n), v.text,
    ]  # fmt: skip


def _count(k: int, n: int) -> str:
    return f"{k / n:.0%} ({k}/{n})" if n else "–"
