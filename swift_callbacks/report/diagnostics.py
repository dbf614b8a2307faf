"""Diagnostics: is a RelInf driven by what the probes say, by how long they are, or by a few pairs?

ℓ(z) is a *sum* of token losses, so a longer completion tends to have a larger gradient, and RelInf grows with the
probe's gradient norm: RelInf(z, z0) = cos(∇z, ∇z0) x |∇z| / |∇z0|. The rules below flag scores to read with care
(each threshold is a module constant, stated in the report):

* **length-driven** (per probe set x evaluation set block, all recorded steps pooled; the one definition, decided
  by :func:`length_driven` and read by every table, caption, verdict and the document): per probe example, take
  its completion token count and its mean RelInf over all its pairs of the block at all recorded steps; the block
  is length-driven when the Spearman rank correlation of the two is ``|ρ| >= LENGTH_CORR_FLAG`` (0.7, a strong
  monotone relation) over at least ``MIN_PROBES_FOR_CORR`` (5) probes with distinct lengths. With fewer probes a
  rank correlation of 0.7 is too easily reached by chance, so it is reported but not flagged. Pooling the steps
  gives each probe one value from all its pairs; a per-step call would flicker with the pairs of each step.
* **length ratio** (studies only; a number, not a flag): a strategy probe set's mean completion token count over
  its study baseline's. A long strategy probe set is not length-driven by itself being long; whether its lead over
  the baseline is gradient size rather than direction is what the verdict's cosine check decides on the data
  (``verdicts``: a call the cosine does not share is not robust).
* **norm effect** (per block and context): flag when the median over pairs of |∇z| / |∇z0| is at least
  ``NORM_RATIO_FLAG`` (3): RelInf is then at least 3x the cosine, so a high RelInf with a low cosine is the size
  of the probe gradient, not agreement of directions. The mean cosine is the length-free comparison.
* **collapsed evaluation gradients** (per evaluation example and step, ``robust``): listed in a table; the
  verdicts say when pairs on them make a call not robust.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .history import CONTEXT_WORDS, StudyView
from .stats import spearman

LENGTH_CORR_FLAG = 0.7
MIN_PROBES_FOR_CORR = 5
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


def length_driven(tokens: np.ndarray, relinf: np.ndarray) -> bool:
    """The one length-driven rule, for one block: per-probe tokens and mean RelInf (module docstring)."""
    tokens = np.asarray(tokens, dtype=np.float64)
    if len(tokens) < MIN_PROBES_FOR_CORR or np.unique(tokens).size < 2:
        return False
    return bool(abs(spearman(tokens, relinf)) >= LENGTH_CORR_FLAG)


def correlation_table(probes: pd.DataFrame) -> pd.DataFrame:
    """Per block: probe count, mean tokens and grad norm, Spearman ρ of tokens / grad norm / RelInf, and
    ``length_driven`` (:func:`length_driven`, the only place the report decides it)."""
    rows = []
    for (probe_set, eval_set), block in probes.groupby(["probe_set", "eval_set"], sort=False):
        tokens, norm, rel = (block[c].to_numpy(dtype=float) for c in ("tokens", "grad_norm", "relinf"))
        rows.append({
            "probe_set": probe_set, "eval_set": eval_set, "probes": len(block), "mean_tokens": float(tokens.mean()),
            "mean_grad_norm": float(norm.mean()), "rho_tokens_relinf": spearman(tokens, rel),
            "rho_norm_relinf": spearman(norm, rel), "rho_tokens_norm": spearman(tokens, norm),
            "length_driven": length_driven(tokens, rel),
        })  # fmt: skip
    return pd.DataFrame(rows)


def length_driven_blocks(correlations: pd.DataFrame) -> list[tuple[str, str]]:
    """The (probe set, evaluation set) blocks the correlation table marks length-driven, in table order."""
    return [(str(r.probe_set), str(r.eval_set)) for r in correlations.itertuples() if r.length_driven]


def length_ratio_table(pairs: pd.DataFrame, views: list[StudyView]) -> pd.DataFrame:
    """Per study strategy probe set: its mean completion tokens against its baseline probe set's (no flag)."""
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
                })  # fmt: skip
    return pd.DataFrame(rows, columns=["study", "probe_set", "baseline", "mean_tokens", "baseline_tokens", "ratio"])


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


def flags(correlations: pd.DataFrame, cosines: pd.DataFrame) -> list[Flag]:
    """Every diagnostic flag: length-driven blocks (from the correlation table's one column) and norm effects."""
    out = [
        Flag("length-driven", r.probe_set, r.eval_set, None,
             f"length-driven: Spearman ρ(tokens, RelInf) = {r.rho_tokens_relinf:+.2f} over the {r.probes} probes "
             f"of {r.probe_set} on {r.eval_set} (|ρ| ≥ {LENGTH_CORR_FLAG})")
        for r in correlations.itertuples() if r.length_driven
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
    "length-driven": "length-driven scores (see Diagnostics)",
    "norm effect": "RelInf inflated by gradient size, low cosine (see Diagnostics)",
}


def cautions(all_flags: list[Flag], probe_set: str, eval_set: str, context: str) -> tuple[str, ...]:
    """The short cautions a verdict about ``probe_set → context eval_set`` carries (deduplicated, in rule order)."""
    return tuple(dict.fromkeys(_CAUTION_WORDS[f.rule] for f in all_flags if f.applies_to(probe_set, eval_set, context)))
