"""The numbers the stages report: ratios, distributions and histograms, as plain JSON-ready values."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def ratio(part: int | float, whole: int | float) -> float | None:
    """``part / whole``, or ``None`` when ``whole`` is 0 (a ratio of nothing is undefined, not 0)."""
    return None if not whole else part / whole


def distribution(values: Sequence[float]) -> dict[str, Any]:
    """Count, min, median, max and mean of ``values`` (all ``None`` but the count when there are none)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"count": 0, "min": None, "median": None, "max": None, "mean": None}
    return {
        "count": len(finite),
        "min": min(finite),
        "median": statistics.median(finite),
        "max": max(finite),
        "mean": statistics.fmean(finite),
    }


def histogram(values: Sequence[float], bins: int = 10, low: float = 0.0, high: float = 1.0) -> dict[str, Any]:
    """Counts of ``values`` in ``bins`` equal-width bins over ``[low, high]``.

    Values outside the range are counted in the first or last bin and reported as ``clipped``, so the counts
    always add up to the number of values.

    Args:
        values: Numbers to count.
        bins: Number of bins (at least 1).
        low: Left edge of the first bin.
        high: Right edge of the last bin (included in it).

    Returns:
        ``{"edges": [...], "counts": [...], "clipped": n}``.
    """
    if bins < 1 or not high > low:
        raise ValueError(f"histogram needs bins >= 1 and high > low, got {bins}, [{low}, {high}]")
    width = (high - low) / bins
    counts = [0] * bins
    clipped = 0
    for value in values:
        if value < low or value > high:
            clipped += 1
        index = min(bins - 1, max(0, int((value - low) / width)))
        counts[index] += 1
    edges = [round(low + i * width, 10) for i in range(bins + 1)]
    return {"edges": edges, "counts": counts, "clipped": clipped}
