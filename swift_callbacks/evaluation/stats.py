"""Accuracy with its confidence interval, alone and as a paired difference between two models.

One model's accuracy gets the Wilson score interval: it is exact enough for a proportion and honest at 0% and
100%, where a percentile bootstrap collapses to zero width (12 wrong answers out of 12 would read "[0%, 0%]").
Differences between two models on the same examples get a paired percentile bootstrap over examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class Interval:
    """An estimate with its percentile-bootstrap interval; ``n`` is the number of decided examples."""

    value: float | None
    low: float | None
    high: float | None
    n: int

    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def bootstrap_mean(values: Sequence[float], resamples: int, confidence: float, seed: int) -> Interval:
    """The mean of ``values`` and its percentile-bootstrap interval (resampling examples).

    No values gives no estimate (``None``), never a zero; one value gives a zero-width interval (report ``n``).
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return Interval(None, None, None, 0)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(data.mean()), float(low), float(high), int(data.size))


def wilson_interval(correct: int, n: int, confidence: float) -> Interval:
    """Accuracy ``correct / n`` with its Wilson score interval; no examples give no estimate (``None``)."""
    if n == 0:
        return Interval(None, None, None, 0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n)


def paired_difference(
    after: Mapping[str, bool], before: Mapping[str, bool], resamples: int, confidence: float, seed: int
) -> Interval:
    """Accuracy of ``after`` minus ``before`` over the examples both decided, with a paired bootstrap interval.

    Args:
        after: Correctness by example id (undecided examples left out).
        before: The same for the reference model.
        resamples: Bootstrap resamples.
        confidence: Interval level.
        seed: Bootstrap seed.
    """
    shared = sorted(set(after) & set(before))
    diffs = [float(after[i]) - float(before[i]) for i in shared]
    return bootstrap_mean(diffs, resamples, confidence, seed)
