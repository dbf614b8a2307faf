"""``build_report``: figures, verdicts and diagnostics of a run's influence history, as Markdown or one HTML file.

The report reads only the store (``swift_influence/`` under the training ``output_dir``): the pairs of every
recorded step and the study definitions in ``metrics.json``. It contains, per study, a figure like the paper's
Figures 1-3 (in-task and cross-task panels, strategy curves solid, baseline curves dashed, 95% bootstrap bands
over pairs), a verdict table (``verdicts``) and a table of robust statistics by step (median, trimmed mean, mean
cosine, top-pair share, collapsed evaluation gradients: ``robust``); for blocks outside any study (every block of a
run without studies), a figure of s_in and s_cross with the same table; and the length / gradient-norm / cosine /
collapsed-norm diagnostics (``diagnostics``). "Length-driven" is decided once (``diagnostics.length_driven``) and
every place that shows it reads ``Analysis.length_driven``.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import diagnostics as diag
from . import robust
from .document import Bullets, Document, Heading, Image, Paragraph, Table, to_html, to_markdown
from .figures import PANEL_TEXT, plot_diagnostics, plot_panels
from .history import (
    CONTEXT_WORDS,
    Curve,
    History,
    ReportError,
    StudyView,
    load_history,
    paired_difference,
    study_views,
    uncovered_blocks,
)
from .verdicts import VERDICT_COLUMNS, Verdict, compare, verdict_row

FORMATS = ("md", "html")
REPORT_DIR = "report"
# Beyond this many pairs, panel (d) of a diagnostics figure shows a seeded random subset (the scatter stays legible).
_MAX_SCATTER_PAIRS = 5000


def build_report(
    output_dir: str | os.PathLike,
    fmt: str = "md",
    out: str | os.PathLike | None = None,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> Path:
    """Write the report of a run and return its path.

    Args:
        output_dir: The training ``output_dir`` (the folder holding ``swift_influence/``; that folder itself is
            accepted too).
        fmt: ``"md"``: ``report.md`` with its PNG figures beside it; ``"html"``: one self-contained HTML file
            (figures inlined as base64 data URIs, inline CSS, no external resource).
        out: Report file path. Default: ``OUTPUT_DIR/report/report.md`` (or ``.html``). Markdown figures are
            written into the folder of ``out``.
        resamples: Bootstrap resamples per band point.
        seed: Seed of the bootstrap generators (the report is deterministic for a given history and seed).

    Returns:
        The path of the written report file.

    Raises:
        ReportError: If the run has no recorded step (or an unreadable metrics.json).
        ValueError: If ``fmt`` is not ``"md"`` or ``"html"``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown report format {fmt!r}; use one of {FORMATS}.")
    history = load_history(output_dir, resamples=resamples, seed=seed)
    target = Path(out) if out is not None else history.output_dir / REPORT_DIR / f"report.{fmt}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "md":
        target.write_text(to_markdown(report_document(history, target.parent)), encoding="utf-8")
        return target
    # The HTML carries its figures inside: draw them in a scratch folder so nothing else is left behind.
    with tempfile.TemporaryDirectory(prefix="swift-report-") as scratch:
        target.write_text(to_html(report_document(history, Path(scratch))), encoding="utf-8")
    return target


@dataclass
class Analysis:
    """Every number of a report, without figures or text.

    Attributes:
        history: The run's history (pairs, study definitions, cached curves).
        views: One per study of metrics.json (empty for a run without studies).
        probes: ``diagnostics.probe_table``: tokens, gradient norm and mean RelInf per probe example and block.
        correlations: ``diagnostics.correlation_table``: Spearman ρ per block and the length-driven mark.
        ratios: ``diagnostics.length_ratio_table``: strategy vs baseline mean completion tokens (a number only).
        cosines: ``diagnostics.cosine_table``: mean RelInf, mean cosine and median norm ratio per block and context.
        flags: Every diagnostic flag.
        verdicts: Per study name, the verdict of each strategy metric against its baseline.
        eval_norms: ``robust.eval_norms``: |∇z0| per step and evaluation example, with the collapse flag.
        length_driven: The length-driven (probe set, evaluation set) blocks: what every table, caption and
            verdict of the report marks as such.
    """

    history: History
    views: list[StudyView]
    probes: pd.DataFrame
    correlations: pd.DataFrame
    ratios: pd.DataFrame
    cosines: pd.DataFrame
    flags: list[diag.Flag]
    verdicts: dict[str, list[Verdict]]
    eval_norms: pd.DataFrame
    length_driven: list[tuple[str, str]]


def analyse(history: History | str | os.PathLike, *, resamples: int = 1000, seed: int = 0) -> Analysis:
    """Verdicts and diagnostics of a run (a ``History`` or its training ``output_dir``), drawing nothing."""
    if not isinstance(history, History):
        history = load_history(history, resamples=resamples, seed=seed)
    views = study_views(history)
    probes = diag.probe_table(history.pairs)
    correlations = diag.correlation_table(probes)
    ratios = diag.length_ratio_table(history.pairs, views)
    cosines = diag.cosine_table(history.pairs)
    flags = diag.flags(correlations, cosines)
    verdicts = {v.name: _verdicts(history, v, flags) for v in views}
    length_driven = diag.length_driven_blocks(correlations)
    return Analysis(history, views, probes, correlations, ratios, cosines, flags, verdicts, history.eval_norms,
                    length_driven)  # fmt: skip


def report_document(history: History, figure_dir: Path) -> Document:
    """The whole report as a ``Document``; figures are drawn into ``figure_dir`` (created if missing)."""
    figure_dir.mkdir(parents=True, exist_ok=True)
    a = analyse(history)
    doc = Document(f"Swift-study report: {history.output_dir.name or history.output_dir}")
    doc.add(*_overview(history, a))
    for view in a.views:
        doc.add(*_study_section(history, view, a.verdicts[view.name], figure_dir))
    if blocks := uncovered_blocks(history, a.views):
        doc.add(*_blocks_section(history, blocks, bool(a.views), figure_dir))
    doc.add(*_diagnostics_section(history, a, figure_dir))
    doc.add(*_method_section(history))
    return doc


# ---- sections ------------------------------------------------------------------------------------------------


def _overview(history: History, a: Analysis) -> list:
    views, verdicts, flags = a.views, a.verdicts, a.flags
    steps = history.steps
    pairs = history.pairs
    blocks = [
        Paragraph(
            f"Run `{history.output_dir}`: {len(steps)} recorded step(s) ({_steps_text(steps)}), "
            f"{len(history.blocks)} probe set x evaluation set block(s), {len(pairs) // max(len(steps), 1)} "
            f"probe/eval pairs per step. Studies: {', '.join(f'`{v.name}`' for v in views) or 'none recorded'}. "
            "Rules behind every number are in the last section, **Method and rules**."
        ),
        _sets_table(pairs),
    ]
    approximate = sorted({str(v) for v in pairs.get("score", ()) if isinstance(v, str) and v != "exact"})
    if approximate:
        blocks.append(Paragraph(
            f"**Approximate scores**: the influence was computed with the score variant {', '.join(approximate)}, "
            "not the exact RelInf of the paper; read every number below as an estimate of it."
        ))  # fmt: skip
    lines = [f"**{v.strategy}** vs {v.baseline}: {v.text}" for vs in verdicts.values() for v in vs]
    if lines:
        blocks += [Heading("Verdicts at a glance"), Bullets(lines)]
    if flags:
        blocks.append(Paragraph(f"{len(flags)} diagnostic flag(s) raised: see **Diagnostics**."))
    blocks.append(Paragraph(f"Length-driven blocks: {_blocks_text(a.length_driven)}."))
    collapsed = a.eval_norms[a.eval_norms.collapsed]
    if not collapsed.empty:
        blocks.append(Paragraph(
            f"{len(collapsed)} collapsed evaluation gradient(s) ({collapsed.eval_id.nunique()} example(s) at "
            f"{collapsed.step.nunique()} step(s)): their pairs' RelInf is inflated; see **Diagnostics**."
        ))  # fmt: skip
    return blocks


def _blocks_text(blocks: list[tuple[str, str]]) -> str:
    """``probe on eval`` for each block, or ``none``: the one wording of the length-driven list."""
    return ", ".join(f"`{p}` on `{e}`" for p, e in blocks) or "none"


def _sets_table(pairs: pd.DataFrame) -> Table:
    rows = []
    for role, id_col, tok_col, set_col in (
        ("probe", "probe_id", "probe_tokens", "probe_set"),
        ("evaluation", "eval_id", "eval_tokens", "eval_set"),
    ):
        examples = pairs.drop_duplicates([set_col, id_col])
        for name, group in examples.groupby(set_col, sort=False):
            rows.append([name, role, len(group), float(group[tok_col].mean())])
    return Table(["set", "role", "examples", "mean completion tokens"], rows)


def _study_section(history: History, view: StudyView, verdicts: list[Verdict], figure_dir: Path) -> list:
    path = figure_dir / f"study-{_slug(view.name)}.png"
    panels = []
    for context in ("in", "cross"):
        metrics = [m for m in view.metrics if m.context == context]
        if metrics:
            curves = [
                (history.curve(m.probe_set, m.eval_set, m.context, m.label), view.is_baseline(m)) for m in metrics
            ]
            panels.append((*PANEL_TEXT[context], curves))
    plot_panels(panels, path, f"Swift study: {view.name}")
    baseline = f"`{view.baseline_probe_set}`" if view.baseline_probe_set else "unknown"
    blocks = [
        Heading(f"Study `{view.name}`"),
        Image(
            path,
            f"Study {view.name}: metrics by step with 95% bootstrap bands over pairs; strategy curves "
            "solid, baseline curves dashed",
        ),
        Paragraph(f"Baseline (plain-QA) probe set: {baseline}."),
    ]
    if verdicts:
        blocks.append(
            Table(VERDICT_COLUMNS, [verdict_row(v) for v in verdicts], caption=f"Verdicts, study {view.name}")
        )
    else:
        blocks.append(
            Paragraph(
                "No verdict: this study's baseline probe set is unknown (not one of the paper's studies and no "
                "`baseline_probe_set` in metrics.json) or its baseline metrics were not recorded."
            )
        )
    curves = [history.curve(m.probe_set, m.eval_set, m.context, m.label) for m in view.metrics]
    blocks.append(_curve_summary(curves, f"Curves, study {view.name}"))
    blocks.append(_robust_table(curves, f"Robust statistics by step, study {view.name}"))
    return blocks


def _verdicts(history: History, view: StudyView, flags: list[diag.Flag]) -> list[Verdict]:
    out = []
    for metric in view.metrics:
        base = view.baseline_of(metric)
        if base is not None:
            strategy = history.curve(metric.probe_set, metric.eval_set, metric.context, metric.label)
            baseline = history.curve(base.probe_set, base.eval_set, base.context, base.label)
            caution = diag.cautions(flags, metric.probe_set, metric.eval_set, metric.context)
            out.append(compare(view.name, strategy, baseline, caution, paired_difference(history, strategy, baseline)))
    return out


def _blocks_section(history: History, blocks: list[tuple[str, str]], with_studies: bool, figure_dir: Path) -> list:
    intro = (
        "Probe set x evaluation set blocks that no study metric covers."
        if with_studies
        else "This run has no study definitions (metrics.json is absent or empty), so there is no baseline to "
        "compare with and no verdict table: each block gets its s_in and s_cross curves."
    )
    out: list = [Heading("Blocks without a study" if with_studies else "Blocks"), Paragraph(intro)]
    for probe_set, eval_set in blocks:
        path = figure_dir / f"block-{_slug(probe_set)}--{_slug(eval_set)}.png"
        curves = {c: history.curve(probe_set, eval_set, c) for c in ("in", "cross")}
        panels = [(*PANEL_TEXT[c], [(curve, False)]) for c, curve in curves.items() if curve.steps.size]
        plot_panels(panels, path, f"{probe_set} → {eval_set}")
        out += [
            Heading(f"`{probe_set}` → `{eval_set}`", 3),
            Image(path, f"{probe_set} on {eval_set}: s_in and s_cross by step with 95% bootstrap bands over pairs"),
            _curve_summary([c for c in curves.values() if c.steps.size], f"Curves, {probe_set} → {eval_set}"),
            _robust_table(list(curves.values()), f"Robust statistics by step, {probe_set} → {eval_set}"),
        ]
    return out


_CURVE_COLUMNS = ["metric", "steps", "first", "last", "mean", "min", "max", "mean band width", "pairs per step"]
_CORRELATION_COLUMNS = [
    "probe set", "eval set", "probes", "mean tokens", "mean grad norm", "ρ(tokens, RelInf)", "ρ(grad norm, RelInf)",
    "ρ(tokens, grad norm)", "length-driven",
]  # fmt: skip
_RATIO_COLUMNS = [
    "study", "strategy probe set", "baseline probe set", "mean tokens", "baseline mean tokens", "length ratio",
]  # fmt: skip
_ROBUST_COLUMNS = [
    "metric", "step", "pairs", "mean RelInf (s)", "95% band", "median", "10%-trimmed mean", "mean cosine",
    f"top {robust.TOP_PAIRS} share of |RelInf|", "dominated", "collapsed evals",
]  # fmt: skip
_COLLAPSED_COLUMNS = ["step", "eval set", "eval example", "|∇z0|", "median |∇z0| (set, step)", "ratio", "eval loss"]
_COSINE_COLUMNS = [
    "probe set", "eval set", "context", "pairs (all steps)", "mean RelInf", "mean cosine", "median |∇z|/|∇z0|",
    "norm effect",
]  # fmt: skip


def _curve_summary(curves: list[Curve], caption: str) -> Table:
    rows = [
        [c.label, c.steps.size, c.mean[0], c.mean[-1], c.mean.mean(), c.mean.min(), c.mean.max(),
         (c.hi - c.lo).mean(), int(c.n_pairs.max())]
        for c in curves
        if c.steps.size
    ]  # fmt: skip
    return Table(_CURVE_COLUMNS, _plain_rows(rows), caption=caption)


def _robust_table(curves: list[Curve], caption: str) -> Table:
    """Per metric and step: the mean (s_in / s_cross) beside the robust numbers of ``robust``."""
    rows = [
        [c.label, int(c.steps[i]), int(c.n_pairs[i]), c.mean[i], f"{c.lo[i]:.4g} to {c.hi[i]:.4g}", c.median[i],
         c.trimmed[i], c.cosine[i], c.top_share[i], robust.dominated(c.top_share[i], int(c.n_pairs[i])),
         int(c.collapsed[i])]
        for c in curves
        for i in range(c.steps.size)
    ]  # fmt: skip
    return Table(_ROBUST_COLUMNS, _plain_rows(rows), caption=caption)


def _collapsed_blocks(eval_norms: pd.DataFrame) -> list:
    """The collapsed evaluation gradients, one row per evaluation example and step (or a sentence: none)."""
    rows = eval_norms[eval_norms.collapsed]
    share = f"{robust.COLLAPSED_NORM_FRACTION:.0%}"
    if rows.empty:
        return [Paragraph(f"Collapsed evaluation gradients (|∇z0| < {share} of its set's median at the step): none.")]
    cols = ["step", "eval_set", "eval_id", "eval_norm", "median_norm", "ratio", "eval_loss"]
    caption = (f"Collapsed evaluation gradients: |∇z0| below {share} of the median of its evaluation set at that "
               "step (its pairs' RelInf is inflated by at least 100x)")  # fmt: skip
    return [Table(_COLLAPSED_COLUMNS, _plain_rows(rows[cols].itertuples(index=False)), caption=caption)]


def _diagnostics_section(history: History, a: Analysis, figure_dir: Path) -> list:
    out: list = [
        Heading("Diagnostics"),
        Paragraph(
            "ℓ(z) sums token losses, so long probes have large gradients and RelInf = cosine x |∇z|/|∇z0| grows "
            "with them. Flags (rules in **Method and rules**):"
        ),
        Bullets([f.text for f in a.flags] or ["no flag raised"]),
        Table(
            _CORRELATION_COLUMNS,
            _plain_rows(a.correlations.itertuples(index=False)),
            caption="Per probe example (all steps pooled): Spearman rank correlations within each block",
        ),
    ]
    if not a.ratios.empty:
        caption = ("Completion length of each strategy probe set against its study's baseline (a number, not a "
                   "flag: length-driven is decided by the rank correlation above)")  # fmt: skip
        out.append(Table(_RATIO_COLUMNS, _plain_rows(a.ratios.itertuples(index=False)), caption=caption))
    cosines = a.cosines.assign(context=a.cosines.context.map(CONTEXT_WORDS))
    caption = "RelInf against cosine (a high RelInf with a low cosine is a gradient-size effect)"
    out.append(Table(_COSINE_COLUMNS, _plain_rows(cosines.itertuples(index=False)), caption=caption))
    out += _collapsed_blocks(a.eval_norms)
    return out + _diagnostic_figures(history, a, figure_dir)


def _diagnostic_figures(history: History, a: Analysis, figure_dir: Path) -> list:
    """One scatter figure per evaluation set; panel (d) shows the pairs of the last recorded step."""
    out, probes = [], a.probes
    last = history.pairs[history.pairs.step == history.steps[-1]]
    for eval_set in dict.fromkeys(probes.eval_set):
        path = figure_dir / f"diagnostics-{_slug(eval_set)}.png"
        shown = last[last.eval_set == eval_set]
        if len(shown) > _MAX_SCATTER_PAIRS:
            shown = shown.sample(_MAX_SCATTER_PAIRS, random_state=history.seed)
        plot_diagnostics(probes[probes.eval_set == eval_set], shown, path, f"Diagnostics on evaluation set {eval_set}")
        marked = [b for b in a.length_driven if b[1] == eval_set]
        out.append(Image(path, f"Diagnostics on {eval_set}: length, gradient norm, RelInf and cosine; length-driven "
                               f"blocks: {_blocks_text(marked).replace('`', '')}"))  # fmt: skip
    return out


def _method_section(history: History) -> list:
    return [Heading("Method and rules"), Bullets(_method_rules(history.resamples, history.seed))]


def _method_rules(resamples: int, seed: int) -> list[str]:
    """The report's rules in words (the same rules the verdicts, robust and diagnostics modules document)."""
    from .verdicts import MAJORITY, MIN_EVAL_EXAMPLES

    corr, min_probes, norm = diag.LENGTH_CORR_FLAG, diag.MIN_PROBES_FOR_CORR, diag.NORM_RATIO_FLAG
    collapse, trim = robust.COLLAPSED_NORM_FRACTION, robust.TRIM_FRACTION
    top, dominance = robust.TOP_PAIRS, robust.DOMINANCE_FLAG
    return [
        "**Curves.** s_in (s_cross) at a step is the mean RelInf over the block's in-task (cross-task) pairs "
        "at that step (eq. 4-5 of the swift-study paper), recomputed from the stored pairs.",
        f"**Bands.** 95% percentile bootstrap over pairs: the pairs of that block, context and step are resampled "
        f"with replacement {resamples} times (numpy Generator, seed {seed}, one stream per curve) and the 2.5% "
        "and 97.5% quantiles of the resampled means are drawn. Pairs share probe and evaluation examples, so they "
        "are not independent: the band shows how much the mean depends on the particular pairs and understates "
        "the uncertainty over fresh examples.",
        "**Baselines.** A strategy metric is compared with the metric of its study's plain-QA probe set (`cot`: "
        "`noncot`; `clarify` and `evaluation`: `pos`; or the `baseline_probe_set` given in metrics.json) on the "
        "same evaluation set in the same context. Baseline curves are dashed, strategy curves solid.",
        f"**Robust statistics.** RelInf divides by |∇z0|², which collapses once the model has learned an "
        f"evaluation example, so a few pairs can set a mean. Beside each mean the report gives the median and the "
        f"{trim:.0%}-trimmed mean (int({trim:g} n) values dropped at each end) of the same RelInf values, their mean "
        f"cosine, the share of their summed |RelInf| held by the top {top} pairs (dominated above {dominance:.0%}, "
        f"with more than {2 * top} pairs) and the evaluation examples with a collapsed gradient: |∇z0| below "
        f"{collapse:.0%} of the median |∇z0| of its evaluation set at that step (its pairs' RelInf then weigh at "
        f"least {1 / collapse**2:.0f}x those of a typical example with the same inner product).",
        "**Verdicts**, over the checkpoints where both metrics are recorded. Beats baseline: checkpoints where "
        "the 95% bootstrap interval of the difference strategy - baseline, paired by evaluation example "
        f"(resampling the evaluation examples), lies above zero with at least {MIN_EVAL_EXAMPLES} paired examples, "
        "and the median of the per-example differences and the mean per-example difference of cosine are above "
        "zero too; behind: the interval below zero and both below zero; not robust: the interval makes a call "
        "that the median or the cosine does not share (the verdict names collapsed evaluation gradients and "
        "dominant top pairs at those checkpoints); otherwise not distinguishable (a band that contains the "
        "baseline never beats it). Ahead from step S: first step of the final run of checkpoints where the "
        "strategy beats the baseline. Strategy > 0: checkpoints where the strategy's own band lies above zero "
        f"(at least {MIN_EVAL_EXAMPLES} pairs) and its median RelInf and mean cosine are above zero. Late "
        "slope: least-squares slope over the last ceil(n/2) checkpoints (at least 2); late change: that slope x "
        "the window's length in steps. Late trend: rising / falling when the late change is larger in size than "
        "the mean half-width of the strategy's band over the window and the curve moved that way over the window; "
        "flat for a constant window; no clear trend otherwise. Mean diff: mean of "
        "(strategy - baseline). Beats by cosine: checkpoints where the mean per-example cosine difference is "
        f"above zero; when the RelInf interval is ahead at more than {MAJORITY:.0%} of checkpoints but cosine is "
        "not, the verdict calls it a gradient-size effect.",
        f"**Length-driven** (the one rule; every table, caption and verdict reads it). Within a probe set x "
        f"evaluation set block, all recorded steps pooled, the Spearman ρ between each probe's completion tokens "
        f"and its mean RelInf (all its pairs); length-driven at |ρ| ≥ {corr} with at least {min_probes} probes of "
        "differing lengths. The length ratio of a strategy probe set to its baseline is shown as a number only: "
        "whether a lead is gradient size rather than direction is what the verdicts' cosine check decides.",
        f"**Norm effect flag.** A block and context whose median |∇z|/|∇z0| over pairs is ≥ {norm:g}: RelInf "
        f"= cosine x |∇z|/|∇z0| is then ≥ {norm:g}x the cosine.",
        "**Gradient norm** of a probe: sqrt(probe_sq_norm), averaged over the recorded steps. The cosine scatter "
        "shows the pairs of the last recorded step.",
    ]


# ---- helpers -------------------------------------------------------------------------------------------------


def _steps_text(steps: list[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def _slug(name: str) -> str:
    """A file-name-safe version of a set or study name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-") or "set"


def _plain(value):
    """numpy scalars to Python ones, so the renderers format them like any number."""
    return value.item() if hasattr(value, "item") else value


def _plain_rows(rows) -> list[list]:
    return [[_plain(v) for v in row] for row in rows]


__all__ = ["FORMATS", "Analysis", "ReportError", "analyse", "build_report", "report_document"]
