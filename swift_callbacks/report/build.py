"""``build_report``: figures, verdicts and diagnostics of a run's influence history, as Markdown or one HTML file.

The report reads only the store (``swift_influence/`` under the training ``output_dir``): the pairs of every
recorded step and the study definitions in ``metrics.json``. It contains, per study, a figure like the paper's
Figures 1-3 (in-task and cross-task panels, strategy curves solid, baseline curves dashed, 95% bootstrap bands
over pairs) and a verdict table (``verdicts``); for blocks outside any study (every block of a run without
studies), a figure of s_in and s_cross; and the length / gradient-norm / cosine diagnostics (``diagnostics``).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import diagnostics as diag
from .document import Bullets, Document, Heading, Image, Paragraph, Table, to_html, to_markdown
from .figures import plot_diagnostics, plot_panels
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
_PANEL_TEXT = {
    "in": ("(a) in-task context", "s_in: mean RelInf over in-task pairs"),
    "cross": ("(b) cross-task context", "s_cross: mean RelInf over cross-task pairs"),
}
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
        correlations: ``diagnostics.correlation_table``: Spearman ρ per block and the length-correlation flag.
        ratios: ``diagnostics.length_ratio_table``: strategy vs baseline mean completion tokens.
        cosines: ``diagnostics.cosine_table``: mean RelInf, mean cosine and median norm ratio per block and context.
        flags: Every diagnostic flag.
        verdicts: Per study name, the verdict of each strategy metric against its baseline.
    """

    history: History
    views: list[StudyView]
    probes: pd.DataFrame
    correlations: pd.DataFrame
    ratios: pd.DataFrame
    cosines: pd.DataFrame
    flags: list[diag.Flag]
    verdicts: dict[str, list[Verdict]]


def analyse(history: History | str | os.PathLike, *, resamples: int = 1000, seed: int = 0) -> Analysis:
    """Verdicts and diagnostics of a run (a ``History`` or its training ``output_dir``), drawing nothing."""
    if not isinstance(history, History):
        history = load_history(history, resamples=resamples, seed=seed)
    views = study_views(history)
    probes = diag.probe_table(history.pairs)
    correlations = diag.correlation_table(probes)
    ratios = diag.length_ratio_table(history.pairs, views)
    cosines = diag.cosine_table(history.pairs)
    flags = diag.flags(correlations, ratios, cosines)
    verdicts = {v.name: _verdicts(history, v, flags) for v in views}
    return Analysis(history, views, probes, correlations, ratios, cosines, flags, verdicts)


def report_document(history: History, figure_dir: Path) -> Document:
    """The whole report as a ``Document``; figures are drawn into ``figure_dir`` (created if missing)."""
    figure_dir.mkdir(parents=True, exist_ok=True)
    a = analyse(history)
    doc = Document(f"Swift-study report: {history.output_dir.name or history.output_dir}")
    doc.add(*_overview(history, a.views, a.verdicts, a.flags))
    for view in a.views:
        doc.add(*_study_section(history, view, a.verdicts[view.name], figure_dir))
    if blocks := uncovered_blocks(history, a.views):
        doc.add(*_blocks_section(history, blocks, bool(a.views), figure_dir))
    doc.add(*_diagnostics_section(history, a, figure_dir))
    doc.add(*_method_section(history))
    return doc


# ---- sections ------------------------------------------------------------------------------------------------


def _overview(history: History, views: list[StudyView], verdicts: dict[str, list[Verdict]], flags) -> list:
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
    lines = [f"**{v.strategy}** vs {v.baseline}: {v.text}" for vs in verdicts.values() for v in vs]
    if lines:
        blocks += [Heading("Verdicts at a glance"), Bullets(lines)]
    if flags:
        blocks.append(Paragraph(f"{len(flags)} diagnostic flag(s) raised: see **Diagnostics**."))
    return blocks


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
            panels.append((*_PANEL_TEXT[context], curves))
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
        panels = [(*_PANEL_TEXT[c], [(curve, False)]) for c, curve in curves.items() if curve.steps.size]
        plot_panels(panels, path, f"{probe_set} → {eval_set}")
        out += [
            Heading(f"`{probe_set}` → `{eval_set}`", 3),
            Image(path, f"{probe_set} on {eval_set}: s_in and s_cross by step with 95% bootstrap bands over pairs"),
            _curve_summary([c for c in curves.values() if c.steps.size], f"Curves, {probe_set} → {eval_set}"),
        ]
    return out


_CURVE_COLUMNS = ["metric", "steps", "first", "last", "mean", "min", "max", "mean band width", "pairs per step"]
_CORRELATION_COLUMNS = [
    "probe set", "eval set", "probes", "mean tokens", "mean grad norm", "ρ(tokens, RelInf)", "ρ(grad norm, RelInf)",
    "ρ(tokens, grad norm)", "length-driven",
]  # fmt: skip
_RATIO_COLUMNS = [
    "study", "strategy probe set", "baseline probe set", "mean tokens", "baseline mean tokens", "ratio",
    "length-driven",
]  # fmt: skip
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
        caption = "Completion length of each strategy probe set against its study's baseline"
        out.append(Table(_RATIO_COLUMNS, _plain_rows(a.ratios.itertuples(index=False)), caption=caption))
    cosines = a.cosines.assign(context=a.cosines.context.map(CONTEXT_WORDS))
    caption = "RelInf against cosine (a high RelInf with a low cosine is a gradient-size effect)"
    out.append(Table(_COSINE_COLUMNS, _plain_rows(cosines.itertuples(index=False)), caption=caption))
    return out + _diagnostic_figures(history, a.probes, figure_dir)


def _diagnostic_figures(history: History, probes: pd.DataFrame, figure_dir: Path) -> list:
    """One scatter figure per evaluation set; panel (d) shows the pairs of the last recorded step."""
    out = []
    last = history.pairs[history.pairs.step == history.steps[-1]]
    for eval_set in dict.fromkeys(probes.eval_set):
        path = figure_dir / f"diagnostics-{_slug(eval_set)}.png"
        shown = last[last.eval_set == eval_set]
        if len(shown) > _MAX_SCATTER_PAIRS:
            shown = shown.sample(_MAX_SCATTER_PAIRS, random_state=history.seed)
        plot_diagnostics(probes[probes.eval_set == eval_set], shown, path, f"Diagnostics on evaluation set {eval_set}")
        out.append(Image(path, f"Diagnostics on {eval_set}: length, gradient norm, RelInf and cosine"))
    return out


def _method_section(history: History) -> list:
    from .verdicts import MAJORITY

    return [Heading("Method and rules"), Bullets(_method_rules(history.resamples, history.seed, MAJORITY))]


def _method_rules(resamples: int, seed: int, majority: float) -> list[str]:
    """The report's rules in words (the same rules the verdicts and diagnostics modules document)."""
    corr, min_probes = diag.LENGTH_CORR_FLAG, diag.MIN_PROBES_FOR_CORR
    ratio, norm = diag.LENGTH_RATIO_FLAG, diag.NORM_RATIO_FLAG
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
        "**Verdicts**, over the checkpoints where both metrics are recorded. Beats baseline: checkpoints where "
        "the 95% bootstrap interval of the difference strategy - baseline, paired by evaluation example "
        "(resampling the evaluation examples), lies above zero with at least 3 paired examples; behind: below "
        "zero; otherwise not distinguishable (a band that contains the baseline never beats it). Ahead from step "
        "S: first step of the final run of checkpoints where the strategy beats the baseline. Strategy > 0: "
        "checkpoints where the strategy's own band lies above zero (at least 3 pairs). Late "
        "slope: least-squares slope over the last ceil(n/2) checkpoints (at least 2); late change: that slope x "
        "the window's length in steps. Late trend: rising / falling when the late change is larger in size than "
        "the mean half-width of the strategy's band over the window and the curve moved that way over the window; "
        "flat for a constant window; no clear trend otherwise. Mean diff: mean of "
        "(strategy - baseline). Beats by cosine: the beats fraction computed on the mean cosine of the same pairs; "
        f"when RelInf is ahead at more than {majority:.0%} of checkpoints but cosine is not, the verdict calls it "
        "a gradient-size effect.",
        f"**Length correlation flag.** Within a block, the Spearman ρ between each probe's completion tokens "
        f"and its mean RelInf (all its pairs, all steps); flagged at |ρ| ≥ {corr} with at least {min_probes} "
        "probes of differing lengths.",
        f"**Length ratio flag.** A strategy probe set whose mean completion tokens are ≥ {ratio:g}x its study "
        "baseline's.",
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
