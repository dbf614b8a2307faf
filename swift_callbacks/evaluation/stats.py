"""Accuracy with its confidence interval, alone and as a paired difference between two models.

One model's accuracy gets the Wilson score interval: it is exact enough for a proportion and honest at 0% and
100%, where a percentile bootstrap collapses to zero width (12 wrong answers out of 12 would read "[0%, 0%]").
A difference between two models on the same examples gets Newcombe's score interval for paired proportions
(his method 10, built from the two Wilson intervals and the correlation of the pairs), for the same reason: when
both models get every example wrong it reads [-24%, +24%] on 12 examples, where a bootstrap reads [0, 0]. Values
that are not 0/1 (correctness averaged over seeds) get a paired percentile bootstrap over examples.
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


def paired_proportions(after: Mapping[str, bool], before: Mapping[str, bool], confidence: float) -> Interval:
    """Accuracy of ``after`` minus ``before`` over the examples both decided, with Newcombe's paired interval."""
    shared = sorted(set(after) & set(before))
    n = len(shared)
    if n == 0:
        return Interval(None, None, None, 0)
    a = sum(after[i] and before[i] for i in shared)
    b = sum(after[i] and not before[i] for i in shared)
    c = sum(before[i] and not after[i] for i in shared)
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    w1, w2 = wilson_interval(a + b, n, confidence), wilson_interval(a + c, n, confidence)
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0
    if denominator:
        # Newcombe's continuity-corrected correlation of the pairs, clipped at zero when it changes sign.
        cross = a * d - b * c
        phi = (max(cross - n / 2, 0) if cross > 0 else cross) / denominator**0.5
    d1, e1, d2, e2 = p1 - w1.low, w1.high - p1, p2 - w2.low, w2.high - p2
    low = (p1 - p2) - max(d1 * d1 - 2 * phi * d1 * e2 + e2 * e2, 0.0) ** 0.5
    high = (p1 - p2) + max(e1 * e1 - 2 * phi * e1 * d2 + d2 * d2, 0.0) ** 0.5
    return Interval(p1 - p2, max(-1.0, low), min(1.0, high), n)


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
