"""The report's view of a run: the stored pairs, the study definitions of ``metrics.json`` and the curves.

Everything is read through ``swift_callbacks.store`` (imported lazily: the store module imports torch, and the
report package must import without it). Curves are recomputed from the pairs with numpy, so that the mean and its
bootstrap band come from the same RelInf values:

* a curve is s_in (in-task pairs) or s_cross (cross-task pairs) of one probe set x evaluation set block, one value
  per recorded step: the mean RelInf of that block's pairs of that context at that step (eq. 4-5);
* its 95% band is a percentile bootstrap over those pairs (resample the pairs with replacement, take the mean,
  ``resamples`` times; seeded per curve). Pairs share probe and evaluation examples, so they are not independent
  draws and the band is a lower bound on the uncertainty of the mean: read it as "how much the curve depends on
  which pairs happened to be chosen", not as a test;
* beside the mean, each step carries the robust numbers of ``robust``: the median and 10%-trimmed mean of the same
  RelInf values, their mean cosine, the share of summed |RelInf| held by the top 2 pairs and the number of the
  block's evaluation examples whose gradient norm has collapsed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError
from ..studies import STUDIES
from .robust import eval_norms, top_share, trimmed_mean
from .stats import bootstrap_mean_ci, curve_rng

logger = logging.getLogger(__name__)

# The plain-QA (baseline) probe set of each registered study (``swift_callbacks.studies.register_study``). A
# ``baseline_probe_set`` entry in a metric's spec in metrics.json, when present, takes precedence.
BASELINE_PROBE_SETS = {name: study.baseline for name, study in STUDIES.items()}

CONTEXT_WORDS = {"in": "In-task", "cross": "Cross-task"}


class ReportError(UserError):
    """The run cannot be reported (no history, unreadable study definitions)."""


@dataclass(frozen=True)
class MetricSpec:
    """One study metric: s_{context} of ``probe_set`` on ``eval_set``, named ``label``."""

    label: str
    probe_set: str
    eval_set: str
    context: str
    study: str | None

    @property
    def block(self) -> tuple[str, str]:
        return (self.probe_set, self.eval_set)


@dataclass
class StudyView:
    """The metrics one figure and one verdict table are about.

    Attributes:
        name: Study name (``cot``, ``clarify``, ``evaluation`` or a custom one).
        baseline_probe_set: The study's plain-QA probe set, or None when unknown (then no verdicts).
        metrics: The study's own metrics, plus the baseline metrics its strategy metrics are compared with (taken
            from another study when both were registered together and share them, or named here when absent).
    """

    name: str
    baseline_probe_set: str | None
    metrics: list[MetricSpec] = field(default_factory=list)

    def is_baseline(self, metric: MetricSpec) -> bool:
        return metric.probe_set == self.baseline_probe_set

    def baseline_of(self, metric: MetricSpec) -> MetricSpec | None:
        """The baseline metric of a strategy metric: same context and evaluation set, baseline probe set."""
        if self.baseline_probe_set is None or self.is_baseline(metric):
            return None
        return next(
            (
                m
                for m in self.metrics
                if m.probe_set == self.baseline_probe_set
                and m.eval_set == metric.eval_set
                and m.context == metric.context
            ),
            None,
        )


@dataclass(frozen=True)
class Curve:
    """A metric over steps with its bootstrap band, the pair count and the robust numbers of the same pairs.

    Every array has one value per step: ``mean`` (the metric), ``lo``/``hi`` (its band), ``n_pairs``, ``cosine``
    (mean cosine), ``median`` and ``trimmed`` (median and trimmed mean of RelInf), ``top_share`` (share of summed
    |RelInf| in the top 2 pairs) and ``collapsed`` (evaluation examples of these pairs with a collapsed norm).
    """

    label: str
    probe_set: str
    eval_set: str
    context: str
    steps: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n_pairs: np.ndarray
    cosine: np.ndarray
    median: np.ndarray
    trimmed: np.ndarray
    top_share: np.ndarray
    collapsed: np.ndarray


@dataclass
class History:
    """A run's stored influence history, as the report reads it."""

    output_dir: Path
    pairs: pd.DataFrame
    specs: dict[str, dict]
    resamples: int = 1000
    seed: int = 0
    _curves: dict[tuple[str, str, str], Curve] = field(default_factory=dict, repr=False)
    _eval_norms: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def eval_norms(self) -> pd.DataFrame:
        """``robust.eval_norms`` of the pairs: |∇z0| per step and evaluation example, with the collapse flag.

        Raises:
            ReportError: If a scored pair has a zero, negative or non-finite evaluation squared norm (its RelInf
                cannot have come from it: the history is inconsistent).
        """
        if self._eval_norms is None:
            sq = self.pairs["eval_sq_norm"].to_numpy(dtype=np.float64)
            bad = self.pairs[~(np.isfinite(sq) & (sq > 0))]
            if not bad.empty:
                first = bad.iloc[0]
                raise ReportError(
                    f"{len(bad)} scored pair(s) have a zero or non-finite eval_sq_norm (first: step {first.step}, "
                    f"evaluation example {first.eval_id!r} of {first.eval_set!r}), so their RelInf cannot come from "
                    "it; the history is inconsistent: rescore the run (swift-study score)."
                )
            self._eval_norms = eval_norms(self.pairs)
        return self._eval_norms

    @property
    def steps(self) -> list[int]:
        return sorted(int(s) for s in self.pairs["step"].unique())

    @property
    def blocks(self) -> list[tuple[str, str]]:
        """Every (probe set, evaluation set) block, in the order the callback registered them."""
        seen = self.pairs[["probe_set", "eval_set"]].drop_duplicates()
        return [(str(p), str(e)) for p, e in seen.itertuples(index=False)]

    def curve(self, probe_set: str, eval_set: str, context: str, label: str | None = None) -> Curve:
        """s_in / s_cross of a block by step with its bootstrap band (computed once, then cached)."""
        key = (probe_set, eval_set, context)
        if key not in self._curves:
            self._curves[key] = self._compute_curve(probe_set, eval_set, context)
        curve = self._curves[key]
        if label is not None and label != curve.label:
            curve = dataclasses.replace(curve, label=label)
        return curve

    def _compute_curve(self, probe_set: str, eval_set: str, context: str) -> Curve:
        sel = self.pairs[(self.pairs.probe_set == probe_set) & (self.pairs.eval_set == eval_set)]
        sel = sel[sel.paired == (context == "in")]
        rng = curve_rng(self.seed, f"{probe_set}\x00{eval_set}\x00{context}")
        norms = self.eval_norms
        collapsed = norms[norms.collapsed & (norms.eval_set == eval_set)].groupby("step")["eval_id"].agg(set)
        rows = []
        for step, group in sel.groupby("step", sort=True):
            values = group["relinf"].to_numpy(dtype=np.float64)
            lo, hi = bootstrap_mean_ci(values, rng, self.resamples)
            flagged = collapsed.get(step, set()) & set(group["eval_id"])
            rows.append((
                int(step), float(values.mean()), lo, hi, values.size,
                float(np.nanmean(group["cosine"].to_numpy(dtype=np.float64))), float(np.median(values)),
                trimmed_mean(values), top_share(values), len(flagged),
            ))  # fmt: skip
        label = f"{probe_set} → {CONTEXT_WORDS[context]} {eval_set}"
        arrays = [np.asarray([r[i] for r in rows], dtype=np.float64) for i in range(10)]
        return Curve(label, probe_set, eval_set, context, *arrays)


@dataclass(frozen=True)
class PairedDifference:
    """Strategy minus baseline by step, paired by evaluation example, with its bootstrap interval.

    For each evaluation example z0, the mean RelInf of the strategy's probes on z0 minus that of the baseline's
    (over the pairs of the context); the interval resamples the evaluation examples. ``median`` is the median of
    those per-example differences and ``cosine`` the mean of the same per-example differences of mean cosine:
    the calls the verdicts check the RelInf interval against.
    """

    steps: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n_eval: np.ndarray
    median: np.ndarray
    cosine: np.ndarray


def paired_difference(history: History, strategy: Curve, baseline: Curve) -> PairedDifference:
    """The :class:`PairedDifference` of two curves on the same evaluation set and context."""
    pairs = history.pairs
    sel = pairs[(pairs.eval_set == strategy.eval_set) & (pairs.paired == (strategy.context == "in"))]
    rng = curve_rng(history.seed, f"diff\x00{strategy.probe_set}\x00{baseline.probe_set}\x00{strategy.eval_set}"
                                  f"\x00{strategy.context}")  # fmt: skip
    rows = []
    for step, group in sel.groupby("step", sort=True):
        rel, cos = (_per_eval_difference(group, strategy, baseline, col) for col in ("relinf", "cosine"))
        lo, hi = bootstrap_mean_ci(rel, rng, history.resamples)
        rows.append((int(step), _mean(rel), lo, hi, rel.size, float(np.median(rel)) if rel.size else math.nan,
                     _mean(cos)))  # fmt: skip
    arrays = [np.asarray([r[i] for r in rows], dtype=np.float64) for i in range(7)]
    return PairedDifference(*arrays)


def _per_eval_difference(group: pd.DataFrame, strategy: Curve, baseline: Curve, column: str) -> np.ndarray:
    """Per evaluation example recorded for both: mean ``column`` of the strategy's pairs minus the baseline's."""
    s = group[group.probe_set == strategy.probe_set].groupby("eval_id")[column].mean()
    b = group[group.probe_set == baseline.probe_set].groupby("eval_id")[column].mean()
    return (s - b).dropna().to_numpy(dtype=np.float64)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def resolve_output_dir(output_dir: str | os.PathLike) -> Path:
    """The training ``output_dir``; the ``swift_influence`` folder itself is accepted too."""
    from ..store import STORE_DIR

    path = Path(output_dir)
    if path.name == STORE_DIR and (path / "pairs").is_dir():
        return path.parent
    return path


def load_history(output_dir: str | os.PathLike, resamples: int = 1000, seed: int = 0) -> History:
    """Read a run's history through the store.

    Raises:
        ReportError: If the folder has no recorded step, or metrics.json is unreadable.
    """
    from ..store import STORE_DIR, HistoryError, load_metric_specs, load_pairs, store_dir

    path = resolve_output_dir(output_dir)
    try:
        # empty_ok: no recorded step yet is reported below; a missing folder or a damaged history raises.
        pairs = load_pairs(path, empty_ok=True)  # a folder that does not exist is named as such
        specs = load_metric_specs(path) if not pairs.empty else {}
    except HistoryError as err:
        raise ReportError(str(err)) from err
    if pairs.empty:
        where = store_dir(path) / "pairs"
        raise ReportError(
            f"No influence history to report under {path}: {where} holds no step-*.parquet file. Point the report "
            f"at the training output_dir of a run with InfluenceCallback attached (the folder that contains "
            f"{STORE_DIR}/), after at least one save or evaluation step."
        )
    unscored = ~np.isfinite(pairs["relinf"].to_numpy(dtype=np.float64))
    if unscored.any():
        # RelInf undefined at that step (see failures.jsonl): left out, as in load_scores and the logged scores.
        logger.warning("Leaving out %d pairs whose RelInf is undefined (see failures.jsonl).", int(unscored.sum()))
        pairs = pairs[~unscored].reset_index(drop=True)
        if pairs.empty:
            raise ReportError(f"Every recorded pair under {path} has an undefined RelInf (see failures.jsonl).")
    return History(path, pairs, _check_specs(specs, store_dir(path) / "metrics.json"), resamples, seed)


def _check_specs(specs: dict[str, dict], path: Path) -> dict[str, dict]:
    missing = [k for k, s in specs.items() if not {"probe_set", "eval_set", "context"} <= set(s)]
    if missing:
        raise ReportError(f"{path}: metrics {missing} lack probe_set / eval_set / context.")
    return specs


def study_views(history: History) -> list[StudyView]:
    """One view per study named in metrics.json, in first-appearance order (empty for a run without studies).

    A study's baseline probe set is the ``baseline_probe_set`` of its specs if given, else
    ``BASELINE_PROBE_SETS[study]``. For each strategy metric, the matching baseline metric (same context, same
    evaluation set) is taken from the study's own specs, else from any spec with that probe set, evaluation set
    and context (studies registered together share the Pos metrics, which metrics.json stores once, under the
    first study), else named after the block, provided the block was recorded.
    """
    specs = [_spec(label, s) for label, s in history.specs.items()]
    names = list(dict.fromkeys(s.study or "study" for s in specs))
    views = []
    for name in names:
        own = [s for s in specs if (s.study or "study") == name]
        declared = {history.specs[s.label].get("baseline_probe_set") for s in own} - {None}
        baseline = next(iter(declared)) if len(declared) == 1 else BASELINE_PROBE_SETS.get(name)
        view = StudyView(name, baseline, list(own))
        view.metrics += _borrowed_baselines(view, specs, set(history.blocks))
        views.append(view)
    return views


def _spec(label: str, spec: dict) -> MetricSpec:
    return MetricSpec(label, str(spec["probe_set"]), str(spec["eval_set"]), str(spec["context"]), spec.get("study"))


def _borrowed_baselines(view: StudyView, specs: Iterable[MetricSpec], blocks: set[tuple[str, str]]) -> list[MetricSpec]:
    """Baseline metrics the view's strategy metrics need but the study's own specs lack."""
    if view.baseline_probe_set is None:
        return []
    specs, extra = list(specs), []
    for metric in view.metrics:
        want = (view.baseline_probe_set, metric.eval_set, metric.context)
        if view.is_baseline(metric) or any((m.probe_set, m.eval_set, m.context) == want for m in view.metrics + extra):
            continue
        found = next((s for s in specs if (s.probe_set, s.eval_set, s.context) == want), None)
        if found is None and want[:2] in blocks:
            found = MetricSpec(f"{want[0]} → {CONTEXT_WORDS[want[2]]} {want[1]}", *want, view.name)
        if found is not None:
            extra.append(found)
    return extra


def uncovered_blocks(history: History, views: list[StudyView]) -> list[tuple[str, str]]:
    """Blocks no study metric is about (all blocks of a run without studies): each gets a figure of its own."""
    covered = {m.block for v in views for m in v.metrics}
    return [b for b in history.blocks if b not in covered]
