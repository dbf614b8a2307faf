"""Diagnostics: is a RelInf driven by what the probes say, or by how long they are?

ℓ(z) is a *sum* of token losses, so a longer completion tends to have a larger gradient, and RelInf grows with the
probe's gradient norm: RelInf(z, z0) = cos(∇z, ∇z0) x |∇z| / |∇z0|. Three rules flag scores to read with care
(each threshold is a module constant, stated in the report):

* **length correlation** (per probe set x evaluation set block): per probe example, take its completion token
  count and its mean RelInf over all its pairs of the block at all recorded steps; flag the block when the
  Spearman rank correlation of the two is ``|ρ| >= LENGTH_CORR_FLAG`` (0.7, a strong monotone relation) over at
  least ``MIN_PROBES_FOR_CORR`` (5) probes with distinct lengths. With fewer probes a rank correlation of 0.7 is
  too easily reached by chance, so it is reported but not flagged.
* **length ratio** (studies only): flag a strategy probe set whose mean completion token count is at least
  ``LENGTH_RATIO_FLAG`` (3x) that of its study's baseline probe set: its summed loss has ~3x as many terms, so
  comparing its RelInf with the baseline's compares lengths as much as content.
* **norm effect** (per block and context): flag when the median over pairs of |∇z| / |∇z0| is at least
  ``NORM_RATIO_FLAG`` (3): RelInf is then at least 3x the cosine, so a high RelInf with a low cosine is the size
  of the probe gradient, not agreement of directions. The mean cosine is the length-free comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .history import CONTEXT_WORDS, StudyView
from .stats import spearman

LENGTH_CORR_FLAG = 0.7
MIN_PROBES_FOR_CORR = 5
LENGTH_RATIO_FLAG = 3.0
NORM_RATIO_FLAG = 3.0


@dataclass(frozen=True)
class Flag:
    """A diagnostic warning about one probe set (in one block and context, when the rule is per block)."""

    rule: str
    probe_set: str
    eval_set: str | None
    context: str | None
    text: str

    def applies_to(self, probe_set: str, eval_set: str, context: str) -> bool:
        return self.probe_set == probe_set and self.eval_set in (None, eval_set) and self.context in (None, context)


def probe_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per (probe set, evaluation set, probe example), all recorded steps pooled.

    Columns: ``probe_set, eval_set, probe_id, tokens`` (completion tokens), ``grad_norm`` (mean over steps of
    sqrt(probe_sq_norm)), ``relinf`` (mean over all the probe's pairs), ``relinf_in``, ``relinf_cross`` (mean over
    its in-task / cross-task pairs; NaN without such pairs) and ``cosine`` (mean cosine over all its pairs).
    """
    p = pairs.assign(
        grad_norm=np.sqrt(pairs["probe_sq_norm"].astype(float)),
        rel_in=pairs["relinf"].where(pairs["paired"].astype(bool)),
        rel_cross=pairs["relinf"].where(~pairs["paired"].astype(bool)),
    )
    keys = ["probe_set", "eval_set", "probe_id"]
    table = p.groupby(keys, sort=False).agg(
        tokens=("probe_tokens", "first"), grad_norm=("grad_norm", "mean"), relinf=("relinf", "mean"),
        relinf_in=("rel_in", "mean"), relinf_cross=("rel_cross", "mean"), cosine=("cosine", "mean"),
    )  # fmt: skip
    return table.reset_index()


def correlation_table(probes: pd.DataFrame) -> pd.DataFrame:
    """Per block: probe count, mean tokens and grad norm, Spearman ρ of tokens / grad norm / RelInf, flag."""
    rows = []
    for (probe_set, eval_set), block in probes.groupby(["probe_set", "eval_set"], sort=False):
        tokens, norm, rel = (block[c].to_numpy(dtype=float) for c in ("tokens", "grad_norm", "relinf"))
        rho = spearman(tokens, rel)
        enough = len(block) >= MIN_PROBES_FOR_CORR and np.unique(tokens).size > 1
        rows.append({
            "probe_set": probe_set, "eval_set": eval_set, "probes": len(block), "mean_tokens": float(tokens.mean()),
            "mean_grad_norm": float(norm.mean()), "rho_tokens_relinf": rho, "rho_norm_relinf": spearman(norm, rel),
            "rho_tokens_norm": spearman(tokens, norm), "length_driven": bool(enough and abs(rho) >= LENGTH_CORR_FLAG),
        })  # fmt: skip
    return pd.DataFrame(rows)


def length_ratio_table(pairs: pd.DataFrame, views: list[StudyView]) -> pd.DataFrame:
    """Per study strategy probe set: its mean completion tokens against its baseline probe set's, and a flag."""
    tokens = pairs.drop_duplicates(["probe_set", "probe_id"]).groupby("probe_set")["probe_tokens"].mean()
    rows = []
    for view in views:
        base = view.baseline_probe_set
        if base is None or base not in tokens:
            continue
        for probe_set in dict.fromkeys(m.probe_set for m in view.metrics if not view.is_baseline(m)):
            if probe_set in tokens:
                ratio = float(tokens[probe_set] / tokens[base])
                rows.append({
                    "study": view.name, "probe_set": probe_set, "baseline": base,
                    "mean_tokens": float(tokens[probe_set]), "baseline_tokens": float(tokens[base]), "ratio": ratio,
                    "length_driven": ratio >= LENGTH_RATIO_FLAG,
                })  # fmt: skip
    return pd.DataFrame(rows, columns=["study", "probe_set", "baseline", "mean_tokens", "baseline_tokens", "ratio",
                                       "length_driven"])  # fmt: skip


def cosine_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per block and context, all steps pooled: mean RelInf, mean cosine, median |∇z|/|∇z0| and the norm flag."""
    p = pairs.assign(
        context=np.where(pairs["paired"].astype(bool), "in", "cross"),
        norm_ratio=np.sqrt(pairs["probe_sq_norm"].astype(float) / pairs["eval_sq_norm"].astype(float)),
    )
    table = p.groupby(["probe_set", "eval_set", "context"], sort=False).agg(
        pairs=("relinf", "size"), mean_relinf=("relinf", "mean"), mean_cosine=("cosine", "mean"),
        median_norm_ratio=("norm_ratio", "median"),
    )  # fmt: skip
    table = table.reset_index()
    table["norm_effect"] = table["median_norm_ratio"] >= NORM_RATIO_FLAG
    return table


def flags(correlations: pd.DataFrame, ratios: pd.DataFrame, cosines: pd.DataFrame) -> list[Flag]:
    """Every diagnostic flag raised by the three rules."""
    out = [
        Flag("length correlation", r.probe_set, r.eval_set, None,
             f"length-driven: Spearman ρ(tokens, RelInf) = {r.rho_tokens_relinf:+.2f} over the {r.probes} probes "
             f"of {r.probe_set} on {r.eval_set} (|ρ| ≥ {LENGTH_CORR_FLAG})")
        for r in correlations.itertuples() if r.length_driven
    ]  # fmt: skip
    out += [
        Flag("length ratio", r.probe_set, None, None,
             f"length-driven: {r.probe_set} probes are {r.ratio:.1f}x as long as the {r.baseline} baseline's "
             f"({r.mean_tokens:.1f} vs {r.baseline_tokens:.1f} tokens; flag at ≥ {LENGTH_RATIO_FLAG:g}x)")
        for r in ratios.itertuples() if r.length_driven
    ]  # fmt: skip
    out += [
        Flag("norm effect", r.probe_set, r.eval_set, r.context,
             f"norm effect: median |∇z|/|∇z0| = {r.median_norm_ratio:.1f} for {r.probe_set} → "
             f"{CONTEXT_WORDS[r.context]} {r.eval_set}, so RelInf is ≥ {NORM_RATIO_FLAG:g}x the cosine "
             f"(mean cosine {r.mean_cosine:+.3f})")
        for r in cosines.itertuples() if r.norm_effect
    ]  # fmt: skip
    return out


# How a flag reads inside a verdict sentence ("...; caution: length-driven scores (see Diagnostics)").
_CAUTION_WORDS = {
    "length correlation": "length-driven scores (see Diagnostics)",
    "length ratio": "length-driven scores (see Diagnostics)",
    "norm effect": "RelInf inflated by gradient size, low cosine (see Diagnostics)",
}


def cautions(all_flags: list[Flag], probe_set: str, eval_set: str, context: str) -> tuple[str, ...]:
    """The short cautions a verdict about ``probe_set → context eval_set`` carries (deduplicated, in rule order)."""
    return tuple(dict.fromkeys(_CAUTION_WORDS[f.rule] for f in all_flags if f.applies_to(probe_set, eval_set, context)))
