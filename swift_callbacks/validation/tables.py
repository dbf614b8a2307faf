"""Table 2 (accuracy of every variant, and its change against Base) and the agreement of the swift verdicts with
the measured changes.

Accuracy of a variant on a set (or one task of it) is the mean over seeds of each seed's accuracy; its interval is
Wilson's with the number of examples (not examples x seeds: seeds share the examples, so they are not new
evidence about them). The change against Base pairs examples. With one seed it is a difference of paired
proportions with Newcombe's score interval (honest when nothing changed: 12 examples both wrong give about
[-24%, +24%], not [0, 0]). With several seeds each example's correctness is averaged over seeds per variant and
the interval is a percentile bootstrap over examples, widened where needed to the seeds' own Newcombe intervals
(averaged): a bootstrap cannot be wider than the spread it sees, and reads [0, 0] when nothing changed.

The swift call of a strategy metric (a verdict of the Base run's history) is *gain* when it beats its baseline at
more than half of the checkpoints, *loss* when it is behind at more than half, else *no call*. The measured call is
*gain* / *loss* when the change's interval lies above / below zero, else *no measurable change*. They *agree* when
both say gain or both loss, or neither shows a difference; they *disagree* when they point opposite ways; the rest
is *inconclusive* (one side shows a difference the other cannot).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..evaluation import EvalResults, Interval, bootstrap_mean, paired_proportions, wilson_interval
from .config import BASE, ValidationConfig

if TYPE_CHECKING:
    from .study import RunSpec

MAJORITY = 0.5
TABLE2_COLUMNS = ["variant", "set", "task", "n", "seeds", "accuracy", "acc_low", "acc_high", "per_seed", "delta",
                  "delta_low", "delta_high"]  # fmt: skip
AGREEMENT_COLUMNS = ["strategy", "swift_metric", "swift_call", "swift_verdict", "variant", "set", "delta",
                     "delta_low", "delta_high", "measured_call", "agreement"]  # fmt: skip


def _by_example(results: EvalResults, runs: list[RunSpec], set_name: str) -> dict[str, pd.DataFrame]:
    """Per variant: correctness by example (rows) and seed (columns), undecided examples as NaN."""
    frames: dict[str, dict[int, dict[str, float]]] = {}
    for run in runs:
        records = results.records[(run.label, set_name)]
        col = {i: (np.nan if r.correct is None else float(r.correct)) for i, r in records.items()}
        frames.setdefault(run.variant.name, {})[run.seed] = col
    return {name: pd.DataFrame(cols) for name, cols in frames.items()}


def table2(config: ValidationConfig, runs: list[RunSpec], results: EvalResults) -> pd.DataFrame:
    """One row per variant, set and task (``all`` first), in the order the variants were given."""
    ev = config.evaluation
    rows = []
    for s in config.evaluation.sets:
        grids = _by_example(results, runs, s.name)
        tasks = _tasks(results, runs[0].label, s.name)
        for variant, grid in grids.items():
            for task, ids in tasks.items():
                g = grid.loc[ids]
                per_seed = g.mean(axis=0, skipna=True)
                mean = float(per_seed.mean())
                n = int(g.notna().any(axis=1).sum())
                acc = wilson_interval(round(mean * n), n, ev.confidence) if n else None
                delta = _delta(grids[BASE].loc[ids], g, ev, f"{variant}/{s.name}/{task}") if variant != BASE else None
                rows.append({
                    "variant": variant, "set": s.name, "task": task, "n": n, "seeds": g.shape[1], "accuracy": mean,
                    "acc_low": acc.low if acc else np.nan, "acc_high": acc.high if acc else np.nan,
                    "per_seed": ", ".join(f"{v:.3f}" for v in per_seed),
                    "delta": delta.value if delta else np.nan, "delta_low": delta.low if delta else np.nan,
                    "delta_high": delta.high if delta else np.nan,
                })  # fmt: skip
    return pd.DataFrame(rows, columns=TABLE2_COLUMNS)


def _tasks(results: EvalResults, label: str, set_name: str) -> dict[str, list[str]]:
    records = results.records[(label, set_name)]
    tasks: dict[str, list[str]] = {"all": list(records)}
    for i, r in records.items():
        if r.task != "all":
            tasks.setdefault(r.task, []).append(i)
    return tasks


def _delta(base: pd.DataFrame, variant: pd.DataFrame, ev, key: str):
    if base.shape[1] == 1 and variant.shape[1] == 1:
        after, before = variant.iloc[:, 0].dropna(), base.iloc[:, 0].dropna()
        return paired_proportions(after.astype(bool).to_dict(), before.astype(bool).to_dict(), ev.confidence)
    diff = (variant.mean(axis=1, skipna=True) - base.mean(axis=1, skipna=True)).dropna()
    boot = bootstrap_mean(diff.tolist(), ev.bootstrap, ev.confidence, ev.seed + zlib.crc32(key.encode()))
    # A bootstrap cannot be wider than the spread it sees (all differences 0 read [0, 0]); never report an
    # interval narrower than the seeds' own Newcombe intervals, averaged.
    seeds = [s for s in variant.columns if s in base.columns]
    per_seed = [paired_proportions(variant[s].dropna().astype(bool).to_dict(), base[s].dropna().astype(bool).to_dict(),
                                   ev.confidence) for s in seeds]  # fmt: skip
    per_seed = [i for i in per_seed if i.n]
    if boot.value is None or not per_seed:
        return boot
    low = min(boot.low, float(np.mean([i.low for i in per_seed])))
    high = max(boot.high, float(np.mean([i.high for i in per_seed])))
    return Interval(boot.value, low, high, boot.n)


def swift_call(verdict: Any) -> str:
    """``gain`` / ``loss`` / ``no call`` from a :class:`~swift_callbacks.report.verdicts.Verdict`."""
    if verdict is None or not verdict.n:
        return "no swift study"
    if verdict.beats > verdict.n * MAJORITY:
        return "gain"
    if verdict.behind > verdict.n * MAJORITY:
        return "loss"
    return "no call"


def measured_call(low: float, high: float) -> str:
    if low > 0:
        return "gain"
    if high < 0:
        return "loss"
    return "no measurable change"


def agreement(swift: str, measured: str) -> str:
    if swift == "no swift study":
        return "no prediction"
    if swift == measured:
        return "agrees"
    if {swift, measured} == {"gain", "loss"}:
        return "disagrees"
    if swift == "no call" and measured == "no measurable change":
        return "agrees: neither shows a difference"
    return "inconclusive"


def agreement_table(config: ValidationConfig, base_run: Path, t2: pd.DataFrame) -> pd.DataFrame:
    """For every strategy metric of the Base run's swift study and every evaluation set: both calls, side by side."""
    from ..report import analyse

    verdicts: Mapping[str, list] = analyse(base_run).verdicts if _has_history(base_run) else {}
    rows = []
    whole = t2[t2.task == "all"]
    for name, strategy in config.strategies.items():
        measured = _measured_rows(whole, name)
        for verdict in verdicts.get(strategy.study, []) if strategy.study else [None]:
            call = swift_call(verdict)
            for row in measured.itertuples():
                found = measured_call(row.delta_low, row.delta_high)
                rows.append({
                    "strategy": name, "swift_metric": verdict.strategy if verdict else "", "swift_call": call,
                    "swift_verdict": verdict.text if verdict else "", "variant": row.variant, "set": row.set,
                    "delta": row.delta, "delta_low": row.delta_low, "delta_high": row.delta_high,
                    "measured_call": found, "agreement": agreement(call, found),
                })  # fmt: skip
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def _measured_rows(whole: pd.DataFrame, strategy: str) -> pd.DataFrame:
    """Base+X where it was trained, else Base->X: the change the swift study predicts."""
    for variant in (f"{BASE}+{strategy}", f"{BASE}->{strategy}"):
        rows = whole[whole.variant == variant]
        if not rows.empty:
            return rows
    return whole.iloc[0:0]


def _has_history(run: Path) -> bool:
    return (run / "swift_influence").is_dir()
