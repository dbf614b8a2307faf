"""``build_report`` on the history of a real (tiny) training run with the CoT study attached."""

from __future__ import annotations

import re

from helpers import make_trainer, set_rows, torch_threads
from PIL import Image

from swift_callbacks import cot_study, load_metrics
from swift_callbacks.report import analyse, build_report


def test_report_of_a_tiny_cot_run(tmp_path):
    n = 6  # six tasks: enough probes for the length-correlation rule
    study = cot_study(
        z=set_rows("cot_study_z", n), z_similar=set_rows("cot_study_z_similar", n), z_cot=set_rows("cot_study_z_cot", n)
    )
    kwargs = {"probe_sets": {}, "eval_sets": {}, "studies": [study], "at_step_zero": True}
    trainer, _ = make_trainer(tmp_path, callback_kwargs=kwargs, max_steps=6, save_steps=3, n_train=48)
    with torch_threads(1):
        trainer.train()

    result = analyse(tmp_path, resamples=200)
    assert [v.name for v in result.views] == ["cot"]
    verdicts = {v.strategy: v for v in result.verdicts["cot"]}
    assert set(verdicts) == {"CoT → In-task non-CoT", "CoT → Cross-task non-CoT"}
    assert all(v.n == 3 and v.baseline.startswith("non-CoT → ") for v in verdicts.values())
    # The CoT probes are several times longer than the plain answers: the length ratio says so (a number).
    assert result.ratios.set_index("probe_set").loc["cot"].ratio >= 3
    # Length-driven is one rule: a verdict carries the caution exactly when its block is marked.
    marked = set(result.length_driven)
    for v in verdicts.values():
        spec = result.history.specs[v.strategy]
        assert ("length-driven" in v.text) == ((spec["probe_set"], spec["eval_set"]) in marked)

    path = build_report(tmp_path, fmt="html")
    html = path.read_text(encoding="utf-8")
    expected = load_metrics(tmp_path)
    assert all(label in html for label in expected.metric.unique())
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 2 and 'src="http' not in html
    md_path = build_report(tmp_path, out=tmp_path / "md" / "report.md")
    for name in re.findall(r"\]\(([^)]+\.png)\)", md_path.read_text(encoding="utf-8")):
        with Image.open(md_path.parent / name) as img:
            assert img.format == "PNG"
