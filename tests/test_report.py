"""``swift-study report`` on stored histories crafted so that every verdict and flag is known in advance."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from swift_callbacks.report import ReportError, add_report_parser, analyse, build_report
from swift_callbacks.report.history import BASELINE_PROBE_SETS, load_history, study_views
from swift_callbacks.report.stats import bootstrap_mean_ci, late_trend, spearman
from swift_callbacks.report.verdicts import VERDICT_COLUMNS, verdict_row
from swift_callbacks.store import PAIR_COLUMNS, InfluenceStore, load_metrics
from swift_callbacks.studies import clarify_study, cot_study, evaluation_study, merge_studies

STEPS = [0, 10, 20, 30]
TASKS = [f"t{i}" for i in range(6)]
COT_TOKENS = [20, 22, 25, 28, 30, 35]  # CoT completions: long and of varying length
# Cross-task means by step: CoT's RelInf ahead of non-CoT at 3 of the 4 checkpoints (from step 10 on), rising late;
# its cosine is ahead only at steps 20 and 30, so step 10 is not robust and it beats the baseline at 2.
COT_CROSS = [0.01, 0.05, 0.06, 0.08]
NONCOT_CROSS = [0.02, 0.01, 0.01, 0.01]
COT_IN = [0.3, 0.3, 0.3, 0.3]
NONCOT_IN = [0.9, 0.8, 0.7, 0.6]


def examples(name: str, tokens: list[int], norms: list[float]) -> list[dict]:
    """One example per task of ``TASKS``, with its completion tokens and gradient norm."""
    rows = zip(TASKS, tokens, norms, strict=True)
    return [{"id": f"{name}-{t}", "task": t, "tokens": k, "norm": n} for t, k, n in rows]


def block(step: int, probe_set: str, probes: list[dict], eval_set: str, evals: list[dict], rel) -> pd.DataFrame:
    """All pairs of one block; ``rel(probe, paired)`` gives each pair's RelInf, the other columns follow from it."""
    rows = []
    for p in probes:
        for e in evals:
            paired = p["task"] == e["task"]
            r = rel(p, paired)
            e_sq = e["norm"] ** 2
            rows.append({
                "step": step, "probe_set": probe_set, "probe_id": p["id"], "probe_task": p["task"],
                "eval_set": eval_set, "eval_id": e["id"], "eval_task": e["task"], "paired": paired,
                "dot": r * e_sq, "eval_sq_norm": e_sq, "relinf": r, "probe_sq_norm": p["norm"] ** 2,
                "cosine": r * e_sq / (p["norm"] * e["norm"]), "probe_tokens": p["tokens"], "eval_tokens": e["tokens"],
                "probe_loss": 1.0, "eval_loss": 1.0,
            })  # fmt: skip
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def write_history(out: Path, frames_by_step: dict[int, list[pd.DataFrame]], metrics: list | None) -> None:
    store = InfluenceStore(out)
    for step, frames in frames_by_step.items():
        store.write_step(step, pd.concat(frames, ignore_index=True))
    if metrics is not None:
        store.write_metrics({
            m.label: {"study": m.study, "probe_set": m.probe_set, "eval_set": m.eval_set, "context": m.context}
            for m in metrics
        })  # fmt: skip


@pytest.fixture(scope="module")
def cot_run(tmp_path_factory) -> Path:
    """A CoT study where CoT's RelInf scales with its length (norm ∝ tokens), so its lead is a size effect."""
    out = tmp_path_factory.mktemp("cot_run")
    cot = examples("cot", COT_TOKENS, [k / 5 for k in COT_TOKENS])
    noncot = examples("noncot", [3] * 6, [1.0] * 6)
    similar = examples("sim", [3] * 6, [1.0] * 6)
    weight = {p["id"]: p["tokens"] / np.mean(COT_TOKENS) for p in cot}  # averages to 1: block means stay exact
    frames = {}
    for i, step in enumerate(STEPS):
        frames[step] = [
            block(step, "cot", cot, "noncot_similar", similar,
                  lambda p, paired, i=i: (COT_IN[i] if paired else COT_CROSS[i]) * weight[p["id"]]),
            block(step, "noncot", noncot, "noncot_similar", similar,
                  lambda p, paired, i=i: NONCOT_IN[i] if paired else NONCOT_CROSS[i]),
        ]  # fmt: skip
    write_history(out, frames, cot_study(None, None, None).metrics)
    return out


@pytest.fixture(scope="module")
def cot_verdicts(cot_run) -> dict[str, dict]:
    """The verdict table rows of the CoT run, by strategy metric (computed without drawing)."""
    rows = [verdict_row(v) for v in analyse(cot_run).verdicts["cot"]]
    return {row[1]: dict(zip(VERDICT_COLUMNS, row, strict=True)) for row in rows}


@pytest.fixture(scope="module")
def cot_md(cot_run) -> Path:
    return build_report(cot_run)


@pytest.fixture(scope="module")
def cot_html(cot_run, tmp_path_factory) -> Path:
    """The HTML report, made through the command-line handler."""
    out = tmp_path_factory.mktemp("html") / "r" / "study.html"
    parser = argparse.ArgumentParser(prog="swift-study")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(cot_run), "--format", "html", "--out", str(out)])
    assert (args.fmt, args.out, args.resamples, args.seed) == ("html", str(out), 1000, 0)
    assert args.func(args) == 0
    return out


def test_curves_match_the_store_metrics(cot_run):
    history = load_history(cot_run)
    metrics = load_metrics(cot_run)
    for view in study_views(history):
        for m in view.metrics:
            curve = history.curve(m.probe_set, m.eval_set, m.context, m.label)
            expected = metrics[metrics.metric == m.label].sort_values("step").value.to_numpy()
            np.testing.assert_allclose(curve.mean, expected, rtol=1e-12)
            assert np.all(curve.lo <= curve.mean + 1e-12) and np.all(curve.mean <= curve.hi + 1e-12)


def test_cot_verdicts_are_the_crafted_ones(cot_verdicts):
    verdicts = cot_verdicts
    assert set(verdicts) == {"CoT → In-task non-CoT", "CoT → Cross-task non-CoT"}
    cross = verdicts["CoT → Cross-task non-CoT"]
    assert cross["baseline metric"] == "non-CoT → Cross-task non-CoT"
    assert cross["checkpoints"] == 4
    assert cross["beats baseline"] == "50% (2/4)"
    assert cross["strategy > 0"] == "100% (4/4)"
    assert cross["not robust (vs baseline / > 0)"] == "1 / 0"
    assert cross["late trend"] == "rising (from step 20)"
    assert cross["late slope /step"] == pytest.approx(0.002)  # (0.08 - 0.06) / 10 over the last half
    assert cross["late change"] == pytest.approx(0.02)
    assert cross["mean diff"] == pytest.approx(np.mean(np.subtract(COT_CROSS, NONCOT_CROSS)))
    # CoT's cosine is RelInf / |∇z| = 0.1875 x RelInf here: ahead by cosine only at steps 20 and 30.
    assert cross["beats by cosine"] == "50% (2/4)"
    text = cross["verdict"]
    assert text.startswith(
        "beats baseline at 50% of checkpoints (2/4), ahead from step 20 on, behind at 1; not robust at 1 "
        "checkpoint(s): the RelInf interval says ahead but the median or the cosine does not agree, driven by "
        "gradient size, not direction (the cosine disagrees); positive throughout; "
    )
    assert "rising late" in text and "not by cosine" in text and "length-driven" in text
    within = verdicts["CoT → In-task non-CoT"]
    assert within["beats baseline"] == "0% (0/4)" and within["late trend"].startswith("flat")
    assert within["verdict"].startswith(
        "never beats baseline (0/4 checkpoints; behind at 4); positive throughout; flat late"
    )


def test_cot_flags(cot_run, cot_md):
    result = analyse(cot_run)
    flags, correlations = result.flags, result.correlations
    assert [(f.rule, f.probe_set, f.eval_set, f.context) for f in flags] == [
        ("length-driven", "cot", "noncot_similar", None),
        ("norm effect", "cot", "noncot_similar", "in"),
        ("norm effect", "cot", "noncot_similar", "cross"),
    ]  # the non-CoT baseline (constant length, unit norms) is clean
    texts = [f.text for f in flags]
    assert texts[0].endswith("ρ(tokens, RelInf) = +1.00 over the 6 probes of cot on noncot_similar (|ρ| ≥ 0.7)")
    assert "median |∇z|/|∇z0| = 5.3 for cot → In-task noncot_similar" in texts[1]
    # The length ratio is a number beside the one length-driven rule, not a second flag.
    assert result.ratios.set_index("probe_set").loc["cot"].ratio == pytest.approx(80 / 9)
    assert "length_driven" not in result.ratios.columns and result.length_driven == [("cot", "noncot_similar")]
    row = correlations.set_index("probe_set").loc["cot"]
    assert row.rho_tokens_relinf == pytest.approx(1.0) and row.rho_tokens_norm == pytest.approx(1.0)
    assert np.isnan(correlations.set_index("probe_set").loc["noncot"].rho_tokens_relinf)
    md = cot_md.read_text(encoding="utf-8")
    assert all(t in md for t in texts)


def test_markdown_report_and_pngs(cot_run, cot_md):
    path = cot_md
    assert path == cot_run / "report" / "report.md"
    text = path.read_text(encoding="utf-8")
    assert "| study | strategy metric | baseline metric |" in text
    assert "CoT → Cross-task non-CoT" in text and "50% (2/4)" in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"study-cot.png", "diagnostics-noncot_similar.png"} <= set(images)
    for name in images:
        with Image.open(path.parent / name) as img:
            img.verify()
            assert img.format == "PNG"
        with Image.open(path.parent / name) as img:
            assert img.size[0] > 600 and img.size[1] > 400


def test_html_report_is_self_contained(cot_html):
    path = cot_html
    assert sorted(p.name for p in path.parent.iterdir()) == ["study.html"]  # figures live inside the file
    html = path.read_text(encoding="utf-8")
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in html and "<script" not in html
    assert "<th>beats baseline</th>" in html and "<td>50% (2/4)</td>" in html
    assert "ahead from step 20 on" in html and "<strong>CoT → Cross-task non-CoT</strong>" in html


def test_shared_baselines_of_clarify_and_evaluation_studies(tmp_path):
    """The two studies share the Pos metrics, stored once under ``clarify``: the evaluation study still gets them."""
    sets = {name: object() for name in ("z_pos", "z_pos_similar", "z_neg_similar")}
    clarify = clarify_study(object(), sets["z_pos"], sets["z_pos_similar"], sets["z_neg_similar"])
    evaluation = evaluation_study(object(), object(), sets["z_pos"], sets["z_pos_similar"], sets["z_neg_similar"])
    _, _, metrics = merge_studies([clarify, evaluation], {}, {})
    assert all(m.study == "clarify" for m in metrics if m.probe_set == "pos")
    level = {"clarify": 0.05, "eval_pos": 0.2, "eval_neg": 0.1, "pos": 0.0}
    ex = examples("x", [5] * 6, [1.0] * 6)
    frames = {
        step: [
            block(step, p, ex, e, ex, lambda _p, paired, v=v, step=step: v + 0.001 * step + (0.5 if paired else 0))
            for p, v in level.items()
            for e in ("pos_similar", "neg_similar")
        ]
        for step in STEPS
    }
    write_history(tmp_path, frames, metrics)
    history = load_history(tmp_path)
    views = {v.name: v for v in study_views(history)}
    assert views["clarify"].baseline_probe_set == "pos" and views["evaluation"].baseline_probe_set == "pos"
    rows = [verdict_row(v) for vs in analyse(history).verdicts.values() for v in vs]
    verdicts = {row[1]: dict(zip(VERDICT_COLUMNS, row, strict=True)) for row in rows}
    assert len(verdicts) == 4 + 8
    row = verdicts["EvalPos → Cross-task Pos"]
    assert row["study"] == "evaluation" and row["baseline metric"] == "Pos → Cross-task Pos"
    assert row["beats baseline"] == "100% (4/4)" and row["late trend"].startswith("rising")
    assert verdicts["Clarify → In-task Neg"]["baseline metric"] == "Pos → In-task Neg"
    assert verdicts["EvalNeg → In-task Pos"]["verdict"].startswith("beats baseline at every checkpoint (4/4)")


def test_baseline_names_exist_in_the_study_definitions():
    studies = {s.name: s for s in (cot_study(1, 2, 3), clarify_study(1, 2, 3, 4), evaluation_study(1, 2, 3, 4, 5))}
    assert set(BASELINE_PROBE_SETS) == set(studies)
    for name, baseline in BASELINE_PROBE_SETS.items():
        assert baseline in studies[name].probe_sets


def test_run_without_studies(tmp_path):
    long_tokens = [10, 20, 30, 40, 50, 60]
    long = examples("long", long_tokens, [k / 10 for k in long_tokens])
    short = examples("short", [4] * 6, [1.0] * 6)
    qa = examples("qa", [4] * 6, [1.0] * 6)
    frames = {
        step: [
            block(step, "long", long, "qa", qa, lambda p, paired: 0.01 * p["tokens"] * (2 if paired else 1)),
            block(step, "short", short, "qa", qa, lambda p, paired: 0.4 if paired else 0.02),
        ]
        for step in (5, 10, 15)
    }
    write_history(tmp_path, frames, metrics=None)
    assert analyse(tmp_path).views == []
    md = build_report(tmp_path).read_text(encoding="utf-8")
    assert "no study definitions" in md and "beats baseline" not in md
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images == ["block-long--qa.png", "block-short--qa.png", "diagnostics-qa.png"]
    assert "Spearman ρ(tokens, RelInf) = +1.00 over the 6 probes of long on qa" in md
    assert "of short on qa" not in md  # constant length: no correlation to flag


def test_empty_history_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="No influence history to report"):
        build_report(tmp_path)
    (tmp_path / "swift_influence" / "pairs").mkdir(parents=True)
    with pytest.raises(ReportError, match=r"holds no step-\*\.parquet file"):
        build_report(tmp_path / "swift_influence")
    with pytest.raises(ValueError, match="Unknown report format"):
        build_report(tmp_path, fmt="pdf")


def test_cli_prints_the_path_or_the_error(cot_html, tmp_path, capsys):
    from swift_callbacks.cli import main

    assert main(["report", str(tmp_path / "nothing")]) == 2  # a user error: one line, exit 2
    err = capsys.readouterr().err
    assert err.startswith("swift-study report: error:") and "does not exist" in err and "Traceback" not in err


def test_report_package_imports_without_torch_or_matplotlib():
    code = (
        "import sys; import swift_callbacks.report as r; from swift_callbacks.report.cli import add_report_parser; "
        "import swift_callbacks.report.build; "
        "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stats_helpers():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, size=400)
    lo, hi = bootstrap_mean_ci(values, np.random.default_rng(1))
    sem = values.std(ddof=1) / 20
    assert lo < values.mean() < hi and (hi - lo) == pytest.approx(2 * 1.96 * sem, rel=0.15)
    assert bootstrap_mean_ci(np.array([0.3]), rng) == (0.3, 0.3)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert np.isnan(spearman([1, 1, 1, 1], [1, 2, 3, 4]))
    trend = late_trend(np.array([0, 10, 20, 30, 40]), np.array([5.0, 0.0, 1.0, 2.0, 3.0]))
    assert (trend.n, trend.first_step) == (3, 20) and trend.slope == pytest.approx(0.1)


def test_single_checkpoint_and_a_block_without_in_task_pairs(tmp_path):
    """Degenerate histories give explicit words, never a crash or a made-up trend."""
    plain = examples("noncot", [5] * 6, [1.0] * 6)
    foreign = [dict(x, task=f"other-{x['task']}") for x in examples("cot", [5] * 6, [1.0] * 6)]  # no shared task
    evals = examples("sim", [5] * 6, [1.0] * 6)
    frames = {
        7: [
            block(7, "cot", foreign, "noncot_similar", evals, lambda p, paired: 0.1),
            block(7, "noncot", plain, "noncot_similar", evals, lambda p, paired: 0.2 if paired else 0.01),
        ]
    }
    write_history(tmp_path, frames, cot_study(None, None, None).metrics)
    verdicts = {v.strategy: v for v in analyse(tmp_path).verdicts["cot"]}
    assert verdicts["CoT → In-task non-CoT"].n == 0
    assert verdicts["CoT → In-task non-CoT"].text == "no checkpoint where both metrics are recorded"
    cross = verdicts["CoT → Cross-task non-CoT"]
    assert (cross.n, cross.trend) == (1, "n/a")
    expected = "beats baseline at every checkpoint (1/1); positive throughout; too few checkpoints for a trend"
    assert cross.text == expected


def test_custom_study_declares_its_baseline_in_metrics_json(tmp_path):
    ex = examples("x", [5] * 6, [1.0] * 6)
    frames = {
        step: [
            block(step, "mine", ex, "qa", ex, lambda p, paired: 0.3 if paired else 0.05),
            block(step, "plain", ex, "qa", ex, lambda p, paired: 0.5 if paired else 0.01),
        ]
        for step in STEPS
    }
    write_history(tmp_path, frames, metrics=None)
    specs = {
        "Mine → Cross-task QA": {"study": "custom", "probe_set": "mine", "eval_set": "qa", "context": "cross"},
        "Plain → Cross-task QA": {"study": "custom", "probe_set": "plain", "eval_set": "qa", "context": "cross"},
    }
    for spec in specs.values():
        spec["baseline_probe_set"] = "plain"
    InfluenceStore(tmp_path).write_metrics(specs)
    (verdict,) = analyse(tmp_path).verdicts["custom"]
    assert (verdict.strategy, verdict.baseline) == ("Mine → Cross-task QA", "Plain → Cross-task QA")
    assert verdict.text.startswith("beats baseline at every checkpoint (4/4); positive throughout; flat late")


def test_a_band_that_contains_the_baseline_never_beats_it(tmp_path):
    """Mean ahead of the baseline at every checkpoint, but the paired interval includes zero: not distinguishable
    (the old rule, strategy mean > baseline mean, said "beats baseline at every checkpoint")."""
    spread = dict(zip(TASKS, [3.0, -3.0, 2.0, -2.0, 1.0, -0.9], strict=True))  # per-eval means differ a lot
    strategy, plain, evals = (examples(n, [5] * 6, [1.0] * 6) for n in ("s", "p", "e"))
    frames = {
        step: [
            block(step, "mine", strategy, "qa", evals, lambda p, paired: spread[p["task"]]),
            block(step, "plain", plain, "qa", evals, lambda p, paired: 0.0),
        ]
        for step in STEPS
    }
    write_history(tmp_path, frames, metrics=None)
    spec = {"study": "custom", "eval_set": "qa", "context": "cross", "baseline_probe_set": "plain"}
    specs = {
        "Mine → Cross-task QA": {**spec, "probe_set": "mine"},
        "Plain → Cross-task QA": {**spec, "probe_set": "plain"},
    }
    InfluenceStore(tmp_path).write_metrics(specs)
    (verdict,) = analyse(tmp_path).verdicts["custom"]
    assert verdict.mean_diff > 0 and (verdict.beats, verdict.behind, verdict.positive) == (0, 0, 0)
    assert verdict.text.startswith("not distinguishable from baseline at any checkpoint (0/4")


@pytest.mark.parametrize(
    ("values", "noise", "word"),
    [([0.8, 0.6, 0.4, 0.2], 0.05, "falling"),  # clearly down, beyond the band
     ([0.8, 0.6, 0.4, 0.2], 0.9, "no clear trend"),  # the same fall inside a wide band: not "flat"
     ([0.3, 0.3, 0.3, 0.3], 0.0, "flat"),  # constant
     ([0.5, 0.0, 1.0, 0.45], 0.0, "no clear trend")],  # the fit rises, the curve ends lower than it started
)  # fmt: skip
def test_trend_words_need_the_band_and_the_curve_to_agree(values, noise, word):
    from swift_callbacks.report.verdicts import _trend_word

    steps, window = np.arange(len(values)) * 10.0, np.asarray(values)
    trend = late_trend(np.concatenate([steps - 100, steps]), np.concatenate([window, window]))  # window = last half
    assert trend.n == len(values)
    assert _trend_word(trend.change, noise, window) == word
