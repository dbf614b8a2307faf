"""Small numeric helpers of the report: a bootstrap band over pairs, rank correlation, a late-training trend.

Only numpy and pandas: the report must run where neither torch nor scipy is wanted.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

# At most this many resampled values are drawn at once, so a block of 10^5 pairs never allocates 10^8 indices.
_MAX_DRAWS = 4_000_000


def curve_rng(seed: int, key: str) -> np.random.Generator:
    """A generator of its own for one curve, so a band does not change when other curves are added or removed."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def bootstrap_mean_ci(
    values: np.ndarray, rng: np.random.Generator, resamples: int = 1000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``.

    Draws ``resamples`` samples of ``len(values)`` values with replacement, takes each sample's mean and returns
    the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those means. With one value there is nothing to
    resample and the interval is that value; with none it is NaN.
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n == 0:
        return math.nan, math.nan
    if n == 1:
        return float(values[0]), float(values[0])
    means = np.empty(resamples)
    chunk = max(1, _MAX_DRAWS // n)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN if a side is constant or n < 3."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3:
        return math.nan
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


@dataclass(frozen=True)
class Trend:
    """Least-squares line over the last half of a curve's checkpoints.

    Attributes:
        slope: RelInf per training step (NaN with fewer than 2 late checkpoints).
        change: ``slope * (last late step - first late step)``: how much the fitted line moves over the window.
        first_step: First step of the window.
        n: Checkpoints in the window.
    """

    slope: float
    change: float
    first_step: int | None
    n: int


def late_trend(steps: np.ndarray, values: np.ndarray) -> Trend:
    """Fit ``value = a + slope * step`` by least squares over the last ``ceil(n / 2)`` checkpoints (at least 2).

    Taking the last half, not the whole run, is how the paper reads its curves ("does not decrease but tends to
    increase", "more effective when introduced during the later stages"): early steps move fast as the model
    adapts and would dominate a whole-run slope.
    """
    steps, values = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    n = steps.size
    if n < 2:
        return Trend(math.nan, math.nan, int(steps[0]) if n else None, n)
    k = max(2, math.ceil(n / 2))
    s, v = steps[-k:], values[-k:]
    # A constant window has slope 0 exactly; a fit would return rounding noise (~1e-17) with a random sign.
    slope = 0.0 if np.ptp(v) == 0 else float(np.polyfit(s, v, 1)[0])
    return Trend(slope, slope * float(s[-1] - s[0]), int(s[0]), k)
