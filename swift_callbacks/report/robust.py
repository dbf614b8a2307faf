"""Robust companions of RelInf: collapsed evaluation gradients, median, trimmed mean, top-pair dominance.

RelInf(z, z0) = <∇z, ∇z0> / |∇z0|² divides by the evaluation example's squared gradient norm. Once the model has
learned an evaluation example its gradient shrinks (loss 0.003 -> |∇z0| 0.04 on a real model), so every pair on
that example is multiplied by a huge factor and a couple of such pairs can set a block's mean (one real run: s_in
went from -2.6 to +40 between two saves; +39 came from 2 of 12 pairs while their median was 0.41). The mean is
still what eq. 4-5 define, so the report keeps it, but it shows these numbers beside it and lets no verdict rest
on the mean alone (``verdicts``):

* **collapsed evaluation gradient** (per evaluation example and step): |∇z0| below ``COLLAPSED_NORM_FRACTION``
  (10%) of the median |∇z0| of its evaluation set at that step. Its pairs' RelInf are then at least 100x those of
  a typical example with the same inner product, so a few of them can decide a mean. The median of the same set at
  the same step is the reference (not the example's own first recorded norm) because it measures exactly what
  sets a pair's weight in the block mean, the denominator compared with the others averaged alongside it, and it
  works from the first recorded step whatever step recording began at.
* **median** and **trimmed mean** of RelInf over a block's pairs of one context at one step; the trimmed mean
  drops the ``TRIM_FRACTION`` (10%) lowest and highest values (``int(0.1 n)`` each side, so nothing is dropped
  below 10 pairs).
* **top-pair share**: the share of the block's summed |RelInf| held by its ``TOP_PAIRS`` (2) largest pairs;
  *dominated* when above ``DOMINANCE_FLAG`` (50%) with more than ``2 x TOP_PAIRS`` pairs (with 4 pairs or fewer, 2
  pairs hold half of any equal values, so the share says nothing there).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

# |∇z0| below this fraction of its set's median at the step: its pairs weigh >= 1 / 0.1² = 100x a typical pair's.
COLLAPSED_NORM_FRACTION = 0.1
# Share dropped at each end by the trimmed mean (the 10%).
TRIM_FRACTION = 0.1
# A block is dominated when its TOP_PAIRS largest |RelInf| hold more than DOMINANCE_FLAG of the summed |RelInf|.
TOP_PAIRS = 2
DOMINANCE_FLAG = 0.5

EVAL_NORM_COLUMNS = ["step", "eval_set", "eval_id", "eval_norm", "median_norm", "ratio", "eval_loss", "collapsed"]


def eval_norms(pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per (step, evaluation set, evaluation example): |∇z0|, its set's median at that step, the flag.

    Columns ``EVAL_NORM_COLUMNS``: ``eval_norm`` = sqrt(eval_sq_norm), ``median_norm`` the median of its
    evaluation set at that step, ``ratio`` their quotient, ``eval_loss`` and ``collapsed`` (``ratio`` below
    ``COLLAPSED_NORM_FRACTION``).
    """
    evals = pairs.drop_duplicates(["step", "eval_set", "eval_id"])
    table = pd.DataFrame({
        "step": evals["step"].astype(int), "eval_set": evals["eval_set"], "eval_id": evals["eval_id"],
        "eval_norm": np.sqrt(evals["eval_sq_norm"].to_numpy(dtype=np.float64)),
        "eval_loss": evals["eval_loss"].to_numpy(dtype=np.float64),
    })  # fmt: skip
    table["median_norm"] = table.groupby(["step", "eval_set"])["eval_norm"].transform("median")
    table["ratio"] = table["eval_norm"] / table["median_norm"]
    table["collapsed"] = table["ratio"] < COLLAPSED_NORM_FRACTION
    return table[EVAL_NORM_COLUMNS].reset_index(drop=True)


def trimmed_mean(values: np.ndarray, fraction: float = TRIM_FRACTION) -> float:
    """Mean after dropping ``int(fraction * n)`` values at each end (the mean itself below ``1 / fraction``)."""
    values = np.sort(np.asarray(values, dtype=np.float64))
    if values.size == 0:
        return math.nan
    k = int(fraction * values.size)
    return float(values[k : values.size - k].mean())


def top_share(values: np.ndarray, top: int = TOP_PAIRS) -> float:
    """Share of ``sum(|values|)`` held by the ``top`` largest ``|values|``; NaN when there is nothing to share."""
    mags = np.sort(np.abs(np.asarray(values, dtype=np.float64)))[::-1]
    total = float(mags.sum())
    return float(mags[:top].sum()) / total if total > 0 else math.nan


def dominated(share: float, n_pairs: int) -> bool:
    """The top-pair share is above ``DOMINANCE_FLAG`` and there are more than ``2 x TOP_PAIRS`` pairs."""
    return bool(n_pairs > 2 * TOP_PAIRS and share > DOMINANCE_FLAG)
