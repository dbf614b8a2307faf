"""Verdicts: does a strategy metric beat its plain-QA baseline, stay positive, and where is it heading?

For each strategy metric of a study (e.g. ``CoT → Cross-task non-CoT``) and its baseline (the study's plain-QA
probe set on the same evaluation set in the same context: ``non-CoT → Cross-task non-CoT``), over the checkpoints
where both are recorded (n of them):

* **beats baseline**: checkpoints where the strategy is ahead beyond doubt: the 95% bootstrap interval of the
  paired difference (strategy minus baseline, paired by evaluation example, resampling the evaluation examples)
  lies above zero, with at least ``MIN_EVAL_EXAMPLES`` paired examples, **and** the same call made by the median
  and by the cosine agrees: the median of the per-example differences and the mean per-example difference of
  cosine are both above zero. **behind**: the interval lies below zero and both agree (below zero). Every other
  checkpoint is *not distinguishable* (a band that contains the baseline never "beats" it) or *not robust*: the
  RelInf interval makes a call that the median or the cosine does not share, so a few pairs, typically on
  evaluation examples whose gradient norm has collapsed (``robust``), decide the mean. (Without the pairs, e.g.
  for curves given directly, the strategy's own band must clear the baseline's mean and the robust calls compare
  the two curves' medians and mean cosines.)
* **ahead from step S**: the earliest checkpoint from which the strategy beats the baseline at every later
  checkpoint (the paper's "after about 150 steps, ... consistently exceeds"); absent when it is not ahead at the end.
* **strategy > 0**: checkpoints where the strategy's own 95% band lies above zero (at least ``MIN_EVAL_EXAMPLES``
  pairs) and its median RelInf and mean cosine are above zero too; a band above zero without them is *not robust*.
* **late trend**: least-squares slope of the strategy metric over the last ceil(n/2) checkpoints (at least 2),
  and the change of the fitted line over that window (slope x window length in steps). The trend is *rising* /
  *falling* when that change is larger in size than the strategy curve's own noise (the mean half-width of its
  95% bootstrap band over the window) and the curve's last value moved the same way from the window's first;
  *flat* only for a constant window; *no clear trend* otherwise (a change within the band is not told apart from
  resampling the pairs, so it is not called flat either). No other threshold is involved.
* **mean difference**: mean of (strategy - baseline) over the checkpoints.
* **beats by cosine**: checkpoints where the mean per-example cosine difference is above zero. RelInf is
  cosine x |∇z| / |∇z0|, so a strategy whose RelInf interval is ahead at a majority (> 50%) of checkpoints but
  whose cosine is not wins through the size of its gradients (often its length), not their direction: the
  verdict says so.
* **dominated**: checkpoints where the strategy's top 2 pairs hold more than half of its summed |RelInf|
  (``robust.dominated``); the verdict names them with the collapsed evaluation examples when it is not robust.

The one-line verdict joins these in plain words, e.g. "beats baseline at 83% of checkpoints (5/6), ahead from
step 150 on; positive throughout; rising late", plus any diagnostic caution on the strategy's probe set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .history import Curve, PairedDifference
from .robust import DOMINANCE_FLAG, TOP_PAIRS, dominated
from .stats import late_trend

# A majority: the cosine caveat fires when RelInf is ahead at more than half of the checkpoints and cosine is not.
MAJORITY = 0.5
# Fewer paired evaluation examples (or pairs) than this at a checkpoint: not distinguishable, whatever the values.
MIN_EVAL_EXAMPLES = 3


@dataclass(frozen=True)
class Verdict:
    """The comparison of one strategy metric with its baseline (fields as in the module docstring).

    ``beats``, ``behind`` and ``positive`` count robust calls only. ``not_robust`` counts checkpoints where the
    RelInf interval said ahead or behind but the median or the cosine did not agree (``beats_relinf``: where it said
    ahead, robust or not); ``not_robust_positive`` where the band was above zero but the median or mean cosine was
    not; ``*_why`` say what drove them. ``dominated``: checkpoints where the top pairs hold more than half of the
    summed |RelInf|; ``collapsed``: collapsed evaluation gradients (example x step) among the not-robust
    checkpoints' pairs.
    """

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
    not_robust: int = 0
    not_robust_positive: int = 0
    beats_relinf: int = 0
    dominated: int = 0
    collapsed: int = 0
    not_robust_why: str = ""
    not_robust_positive_why: str = ""

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
    steps, s, b, s_idx, b_idx = steps[ok], s[ok], b[ok], s_idx[ok], b_idx[ok]
    ahead, behind, median, cosine = _difference_calls(strategy, baseline, s_idx, b_idx, steps, paired)
    above = (strategy.n_pairs[s_idx] >= MIN_EVAL_EXAMPLES) & (strategy.lo[s_idx] > 0)
    pairs = zip(strategy.top_share[s_idx], strategy.n_pairs[s_idx], strict=True)
    heavy = np.array([dominated(x, int(n)) for x, n in pairs], dtype=bool)
    collapsed = strategy.collapsed[s_idx]
    up = _robust(ahead, 1, median, cosine, heavy, collapsed)
    down = _robust(behind, -1, median, cosine, heavy, collapsed)
    pos = _robust(above, 1, strategy.median[s_idx], strategy.cosine[s_idx], heavy, collapsed)
    trend = late_trend(steps, s)
    half = (strategy.hi[s_idx] - strategy.lo[s_idx]) / 2.0
    noise = float(np.nanmean(half[-trend.n :])) if trend.n >= 2 else math.nan
    fields = {
        "study": study, "strategy": strategy.label, "baseline": baseline.label, "n": int(steps.size),
        "beats": int(up.kept.sum()), "behind": int(down.kept.sum()), "positive": int(pos.kept.sum()),
        "ahead_from": _ahead_from(steps, up.kept), "late_slope": trend.slope, "late_change": trend.change,
        "late_noise": noise, "late_from": trend.first_step,
        "trend": _trend_word(trend.change, noise, s[-trend.n :] if trend.n >= 2 else s),
        "mean_diff": float(np.mean(s - b)) if s.size else math.nan, "beats_cosine": int((cosine > 0).sum()),
        "cautions": tuple(cautions), "not_robust": int(up.fragile.sum() + down.fragile.sum()),
        "not_robust_positive": int(pos.fragile.sum()), "beats_relinf": int(ahead.sum()),
        "dominated": int(heavy.sum()), "collapsed": int(collapsed[up.fragile | down.fragile | pos.fragile].sum()),
        "not_robust_why": _join_why(up.why, down.why), "not_robust_positive_why": pos.why,
    }  # fmt: skip
    return Verdict(**fields, text=_sentence(fields))


@dataclass(frozen=True)
class _Call:
    """One RelInf call checked against the median and the cosine: kept, not robust, and why not."""

    kept: np.ndarray
    fragile: np.ndarray
    why: str


def _robust(
    claim: np.ndarray, sign: int, median: np.ndarray, cosine: np.ndarray, heavy: np.ndarray, collapsed: np.ndarray
) -> _Call:
    """Keep a RelInf call (``claim``, in direction ``sign``) only where the median and the cosine share its sign."""
    median_ok, cosine_ok = sign * median > 0, sign * cosine > 0
    kept, fragile = claim & median_ok & cosine_ok, claim & ~(median_ok & cosine_ok)
    why = []
    if (k := int(collapsed[fragile].sum())) > 0:
        why.append(f"pairs on {k} collapsed evaluation gradient(s)")
    if (fragile & heavy).any():
        why.append(f"its top {TOP_PAIRS} pairs (> {DOMINANCE_FLAG:.0%} of its summed |RelInf|)")
    if (fragile & ~median_ok).any() and not why:
        why.append("a few large pairs (the median disagrees)")
    if (fragile & ~cosine_ok).any():
        why.append("gradient size, not direction (the cosine disagrees)")
    return _Call(kept, fragile, " and ".join(why))


def _join_why(*whys: str) -> str:
    return " and ".join(dict.fromkeys(w for w in whys if w))


def _difference_calls(
    strategy: Curve,
    baseline: Curve,
    s_idx: np.ndarray,
    b_idx: np.ndarray,
    steps: np.ndarray,
    paired: PairedDifference | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per checkpoint: the RelInf calls (ahead, behind) and the robust differences (median, cosine)."""
    if paired is None:
        enough = strategy.n_pairs[s_idx] >= MIN_EVAL_EXAMPLES
        b = baseline.mean[b_idx]
        ahead, behind = enough & (strategy.lo[s_idx] > b), enough & (strategy.hi[s_idx] < b)
        median = strategy.median[s_idx] - baseline.median[b_idx]
        return ahead, behind, median, strategy.cosine[s_idx] - baseline.cosine[b_idx]
    at = {int(x): i for i, x in enumerate(paired.steps)}
    idx = np.array([at.get(int(x), -1) for x in steps], dtype=int)
    found = idx >= 0

    def pick(values: np.ndarray) -> np.ndarray:
        return np.where(found, values[np.maximum(idx, 0)] if values.size else np.nan, np.nan)

    enough = found & (pick(paired.n_eval) >= MIN_EVAL_EXAMPLES)
    lo, hi = pick(paired.lo), pick(paired.hi)
    return enough & (lo > 0), enough & (hi < 0), pick(paired.median), pick(paired.cosine)


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
    n = f["n"]
    if n == 0:
        return "no checkpoint where both metrics are recorded"
    parts = [_baseline_words(f)]
    if f["not_robust"]:
        parts.append(f"not robust at {f['not_robust']} checkpoint(s): the RelInf interval {_call(f)} but the median "
                     f"or the cosine does not agree, driven by {f['not_robust_why']}")  # fmt: skip
    pos = f["positive"]
    if pos in (0, n):
        parts.append("positive throughout" if pos == n else "never clearly positive")
    else:
        parts.append(f"positive at {pos / n:.0%} of checkpoints")
    if f["not_robust_positive"]:
        parts[-1] += (f" (its band is above zero at {f['not_robust_positive']} more, not robustly: driven by "
                      f"{f['not_robust_positive_why']})")  # fmt: skip
    words = {"n/a": "too few checkpoints for a trend", "no clear trend": "no clear late trend"}
    parts.append(words.get(f["trend"], f"{f['trend']} late"))
    if f["beats_relinf"] / n > MAJORITY and f["beats_cosine"] / n <= MAJORITY:
        parts.append("ahead by RelInf but not by cosine (a gradient-size effect)")
    if f["dominated"]:
        parts.append(f"its top {TOP_PAIRS} pairs hold more than {DOMINANCE_FLAG:.0%} of its summed |RelInf| at "
                     f"{f['dominated']} checkpoint(s)")  # fmt: skip
    parts += [f"caution: {c}" for c in f["cautions"]]
    return "; ".join(parts)


def _baseline_words(f: dict) -> str:
    """The comparison with the baseline: beats / behind / not distinguishable counts (not robust ones apart)."""
    n, k, behind, fragile = f["n"], f["beats"], f["behind"], f["not_robust"]
    unclear = n - k - behind - fragile
    if k == n:
        return f"beats baseline at every checkpoint ({k}/{n})"
    if k == behind == fragile == 0:
        return f"not distinguishable from baseline at any checkpoint (0/{n}: the 95% intervals include it)"
    if k == 0 and behind == 0:
        return f"never beats baseline robustly (0/{n} checkpoints" + (f"; not distinguishable at {unclear})"
                                                                      if unclear else ")")  # fmt: skip
    if k == 0:
        return f"never beats baseline (0/{n} checkpoints; behind at {behind})"
    since = f", ahead from step {f['ahead_from']} on" if f["ahead_from"] is not None else ""
    text = f"beats baseline at {k / n:.0%} of checkpoints ({k}/{n}){since}"
    if unclear:
        text += f", not distinguishable at {unclear}"
    return text + (f", behind at {behind}" if behind else "")


def _call(f: dict) -> str:
    """What the RelInf interval claimed at the checkpoints that were not robust."""
    ahead = f["beats_relinf"] - f["beats"]
    return "says ahead" if ahead == f["not_robust"] else "says behind" if ahead == 0 else "says ahead or behind"


VERDICT_COLUMNS = [
    "study", "strategy metric", "baseline metric", "checkpoints", "beats baseline", "strategy > 0",
    "not robust (vs baseline / > 0)",
    "late slope /step", "late change", "late trend", "mean diff", "beats by cosine", "verdict",
]  # fmt: skip


def verdict_row(v: Verdict) -> list:
    """One row of the verdict table (columns ``VERDICT_COLUMNS``)."""
    window = f" (from step {v.late_from})" if v.late_from is not None and v.trend != "n/a" else ""
    return [
        v.study, v.strategy, v.baseline, v.n, _count(v.beats, v.n), _count(v.positive, v.n),
        f"{v.not_robust} / {v.not_robust_positive}" if v.n else "–", v.late_slope, v.late_change,
        v.trend + window, v.mean_diff, _count(v.beats_cosine, v.n), v.text,
    ]  # fmt: skip


def _count(k: int, n: int) -> str:
    return f"{k / n:.0%} ({k}/{n})" if n else "–"
