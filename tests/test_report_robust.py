"""Honest verdicts on constructed pair tables: collapsed evaluation norms, robust statistics, one length rule."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from swift_callbacks.report import analyse
from swift_callbacks.report.build import report_document
from swift_callbacks.report.document import to_markdown
from swift_callbacks.report.history import History
from swift_callbacks.report.robust import (
    COLLAPSED_NORM_FRACTION,
    dominated,
    eval_norms,
    top_share,
    trimmed_mean,
)
from swift_callbacks.store import PAIR_COLUMNS

TASKS = [f"t{i:02d}" for i in range(12)]
STEPS = [10, 20]


def pair(step, probe_set, task, eval_task, relinf, cosine, eval_norm=1.0, tokens=5, eval_set="qa") -> dict:
    """One stored pair whose dot, probe norm and cosine agree: RelInf = cosine x |∇z| / |∇z0|."""
    dot = relinf * eval_norm**2
    probe_norm = dot / (cosine * eval_norm) if cosine else 1.0
    return {
        "step": step, "probe_set": probe_set, "probe_id": f"{probe_set}-{task}", "probe_task": task,
        "eval_set": eval_set, "eval_id": f"{eval_set}-{eval_task}", "eval_task": eval_task,
        "paired": task == eval_task, "dot": dot, "eval_sq_norm": eval_norm**2, "relinf": relinf,
        "probe_sq_norm": probe_norm**2, "cosine": cosine, "probe_tokens": tokens, "eval_tokens": 5,
        "probe_loss": 1.0, "eval_loss": 0.003 if eval_norm < 0.1 else 1.0,
    }  # fmt: skip


def history(rows: list[dict], strategies: list[str], tmp_path: Path, resamples: int = 4000) -> History:
    """A history of in-task metrics of ``strategies`` against the ``plain`` baseline on ``qa``."""
    specs = {
        f"{p} → In-task QA": {"study": "custom", "probe_set": p, "eval_set": "qa", "context": "in",
                              "baseline_probe_set": "plain"}
        for p in [*strategies, "plain"]
    }  # fmt: skip
    return History(tmp_path, pd.DataFrame(rows, columns=PAIR_COLUMNS), specs, resamples=resamples)


# Per evaluation task of the strategy: (RelInf, cosine, |∇z0|). Two evaluation examples are learned (|∇z0| = 0.01,
# a hundredth of the others), so a tiny cosine gives RelInf 20 on them; 3 pairs are moderately positive (a long
# probe: cosine 0.03, RelInf 3) and 7 slightly negative. The mean is +4.0, carried by the 2 collapsed pairs; the
# median (-0.1) and the mean cosine (-0.018) are not positive.
SKEWED = [(20.0, 0.02, 0.01)] * 2 + [(3.0, 0.03, 1.0)] * 3 + [(-0.1, -0.05, 1.0)] * 7
CLEAN = [(0.5 + 0.01 * i, 0.3, 1.0) for i in range(12)]


def in_task_rows(probe_set: str, spec: list[tuple[float, float, float]], sign: float = 1.0) -> list[dict]:
    """In-task pairs of ``probe_set`` (one per task) and the baseline's (RelInf 0 on the same examples)."""
    rows = []
    for step in STEPS:
        for task, (rel, cos, norm) in zip(TASKS, spec, strict=True):
            rows.append(pair(step, probe_set, task, task, sign * rel, sign * cos, eval_norm=norm))
            rows.append(pair(step, "plain", task, task, 0.0, 0.0, eval_norm=norm))
    return rows


def verdict_of(tmp_path: Path, spec, sign: float = 1.0):
    h = history(in_task_rows("mine", spec, sign), ["mine"], tmp_path)
    (verdict,) = analyse(h).verdicts["custom"]
    return h, verdict


def test_skewed_block_beats_nothing_and_is_not_positive(tmp_path):
    h, v = verdict_of(tmp_path, SKEWED)
    curve = h.curve("mine", "qa", "in")
    assert curve.mean == pytest.approx([48.3 / 12] * 2) and curve.median == pytest.approx([-0.1] * 2)
    assert np.all(curve.cosine < 0) and np.all(curve.collapsed == 2) and np.all(curve.top_share > 0.5)
    # The RelInf intervals alone say "ahead" and "above zero" at both checkpoints: the rule under test must overrule.
    assert v.beats_relinf == 2 and np.all(curve.lo > 0)
    assert (v.beats, v.positive, v.behind) == (0, 0, 0)
    assert (v.not_robust, v.not_robust_positive, v.dominated, v.collapsed) == (2, 2, 2, 4)
    assert v.text.startswith(
        "never beats baseline robustly (0/2 checkpoints); not robust at 2 checkpoint(s): the RelInf interval says "
        "ahead but the median or the cosine does not agree, driven by pairs on 4 collapsed evaluation gradient(s) "
        "and its top 2 pairs (> 50% of its summed |RelInf|) and gradient size, not direction (the cosine disagrees)"
    )
    assert "never clearly positive (its band is above zero at 2 more, not robustly" in v.text


def test_mirrored_skewed_block_is_not_behind(tmp_path):
    _, v = verdict_of(tmp_path, SKEWED, sign=-1.0)
    assert (v.beats, v.behind, v.not_robust) == (0, 0, 2)
    assert "the RelInf interval says behind" in v.text


def test_clean_block_beats_and_is_positive(tmp_path):
    _, v = verdict_of(tmp_path, CLEAN)
    assert (v.beats, v.positive, v.not_robust, v.not_robust_positive, v.dominated, v.collapsed) == (2, 2, 0, 0, 0, 0)
    assert v.text.startswith("beats baseline at every checkpoint (2/2); positive throughout")
    assert "not robust" not in v.text


def test_the_report_lists_collapsed_examples_and_robust_numbers(tmp_path):
    h = history(in_task_rows("mine", SKEWED), ["mine"], tmp_path)
    md = to_markdown(report_document(h, tmp_path / "figures"))
    table = _table(md, "Collapsed evaluation gradients")
    assert [(r["step"], r["eval example"]) for r in table] == [(s, f"qa-{t}") for s in ("10", "20") for t in TASKS[:2]]
    assert all(float(r["ratio"]) == pytest.approx(0.01) for r in table)
    robust = {(r["metric"], r["step"]): r for r in _table(md, "Robust statistics by step")}
    row = robust[("mine → In-task QA", "10")]
    assert (row["median"], row["mean cosine"], row["dominated"], row["collapsed evals"]) == ("-0.1", "-0.01833", "yes",
                                                                                             "2")  # fmt: skip
    assert float(row["mean RelInf (s)"]) == pytest.approx(4.025) and float(row["10%-trimmed mean"]) == pytest.approx(
        (40 + 9 - 0.7 - 20 + 0.1) / 10
    )
    assert "2 collapsed evaluation gradient(s)" not in md and "4 collapsed evaluation gradient(s) (2 example(s)" in md


def test_robust_helpers():
    assert trimmed_mean(np.arange(10.0)) == pytest.approx(np.mean(np.arange(1.0, 9.0)))  # one dropped at each end
    assert trimmed_mean(np.array([1.0, 100.0])) == pytest.approx(50.5)  # under 10 values nothing is dropped
    assert np.isnan(trimmed_mean(np.array([])))
    assert top_share(np.array([5.0, -3.0, 1.0, 1.0])) == pytest.approx(0.8)
    assert np.isnan(top_share(np.zeros(3)))
    assert dominated(0.8, 5) and not dominated(0.5, 12) and not dominated(0.9, 4)


def test_collapsed_rule_is_relative_to_the_sets_median_at_that_step():
    norms = [1.0, 1.0, 2.0, 0.099, 0.101]  # median 1.0: 0.099 is below 10% of it, 0.101 is not
    rows = [pair(5, "p", "a", f"e{i}", 0.1, 0.1, eval_norm=n) for i, n in enumerate(norms)]
    rows += [pair(6, "p", "a", f"e{i}", 0.1, 0.1, eval_norm=n / 100) for i, n in enumerate(norms)]  # all shrink
    table = eval_norms(pd.DataFrame(rows, columns=PAIR_COLUMNS)).set_index(["step", "eval_id"])
    assert COLLAPSED_NORM_FRACTION == 0.1
    assert table.collapsed.loc[5].to_dict() == {"qa-e0": False, "qa-e1": False, "qa-e2": False, "qa-e3": True,
                                                "qa-e4": False}  # fmt: skip
    assert table.collapsed.loc[6].tolist() == table.collapsed.loc[5].tolist()  # a uniform shrink flags nobody new
    assert table.loc[(5, "qa-e3")].ratio == pytest.approx(0.099)


# ---- one definition of length-driven -------------------------------------------------------------------------


def test_every_length_driven_mark_agrees(tmp_path):
    """``long`` is 10x as long as the baseline but its RelInf does not follow its length (the old length-ratio rule
    marked it length-driven in one table while the correlation table said no); ``grow``'s RelInf rises with its
    length. Every place of the report must mark ``grow`` and only ``grow``."""
    rows = []
    for step in STEPS:
        for i, task in enumerate(TASKS):
            for eval_task in TASKS:
                shared = {"step": step, "task": task, "eval_task": eval_task}
                rows.append(_p(shared, "long", 0.3 if i % 2 else 0.2, tokens=50 + i))
                rows.append(_p(shared, "grow", 0.01 * (10 + i), tokens=10 + i))
                rows.append(_p(shared, "plain", 0.1, tokens=5))
    h = history(rows, ["long", "grow"], tmp_path, resamples=200)
    a = analyse(h)
    assert a.length_driven == [("grow", "qa")]
    assert a.ratios.set_index("probe_set").ratio.round(1).to_dict() == {"long": 11.1, "grow": 3.1}
    md = to_markdown(report_document(h, tmp_path / "figures"))
    marked_columns = [t for t in _tables(md) if any("length-driven" in c for c in t[0])]
    assert len(marked_columns) == 1, "one table carries the length-driven mark"
    table = [dict(zip(marked_columns[0][0], r, strict=True)) for r in marked_columns[0][1]]
    in_table = {(r["probe set"], r["eval set"]) for r in table if r["length-driven"] == "yes"}
    bullets = re.findall(r"^- length-driven: (.*)$", md, flags=re.M)
    in_flags = {(p, "qa") for line in bullets for p in ("long", "grow", "plain") if re.search(rf"\b{p}\b", line)}
    assert len(bullets) == len(in_flags)
    in_overview = set(re.findall(r"`(\S+)` on `(\S+)`", re.search(r"Length-driven blocks: (.*)\.", md).group(1)))
    in_caption = set(re.findall(r"(\S+) on (\S+?)(?:,|\])", re.search(r"length-driven blocks: ([^\]]*\])", md)[1]))
    verdicts = {(h.specs[v.strategy]["probe_set"], "qa") for v in a.verdicts["custom"] if "length-driven" in v.text}
    in_verdict_rows = {(m.group(1), "qa") for m in re.finditer(r"^\| custom \| (\S+) → .*length-driven", md, re.M)}
    assert in_table == in_flags == in_overview == in_caption == verdicts == in_verdict_rows == {("grow", "qa")}


def _p(shared: dict, probe_set: str, relinf: float, tokens: int) -> dict:
    return pair(shared["step"], probe_set, shared["task"], shared["eval_task"], relinf, 0.1, tokens=tokens)


def _tables(md: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every pipe table of a Markdown report as (header, rows), cells unescaped."""
    out = []
    for chunk in md.split("\n\n"):
        lines = [ln for ln in chunk.splitlines() if ln.startswith("|")]
        if len(lines) >= 2:
            cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]
            out.append((cells[0], cells[2:]))
    return out


def _table(md: str, caption: str) -> list[dict]:
    """The rows of the table whose caption starts with ``caption``, as dicts by column."""
    chunks = md.split("\n\n")
    for i, chunk in enumerate(chunks[:-1]):
        if chunk.startswith(f"*{caption}"):
            ((header, rows),) = _tables(chunks[i + 1])
            return [dict(zip(header, r, strict=True)) for r in rows]
    raise AssertionError(f"no table captioned {caption!r}")


def test_a_scored_pair_without_an_evaluation_norm_is_one_clear_error(tmp_path):
    from swift_callbacks.report import ReportError

    rows = in_task_rows("mine", CLEAN)
    rows[3]["eval_sq_norm"] = 0.0
    with pytest.raises(
        ReportError, match=r"1 scored pair\(s\) have a zero or non-finite eval_sq_norm \(first: step 10"
    ):
        analyse(history(rows, ["mine"], tmp_path))
