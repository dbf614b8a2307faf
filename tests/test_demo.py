"""The demo pipeline end to end (shortened schedule) and the CLI wiring."""

from __future__ import annotations

from pathlib import Path

import pytest

from swift_callbacks import load_metrics, load_scores
from swift_callbacks.cli import build_parser
from swift_callbacks.demo.run import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_runs_a_complete_cot_study(tmp_path, capsys):
    cfg = DemoConfig(output_dir=str(tmp_path), warmup_epochs=0.5, epochs=0.5, save_every=5, batch_size=16)
    result = run_demo(cfg)
    out = capsys.readouterr().out
    assert "CoT → Cross-task non-CoT" in out and "exact-match accuracy" in out
    metrics = load_metrics(result["run_dir"])
    assert sorted(metrics.metric.unique()) == sorted(
        [
            "CoT → In-task non-CoT",
            "non-CoT → In-task non-CoT",
            "CoT → Cross-task non-CoT",
            "non-CoT → Cross-task non-CoT",
        ]
    )
    steps = sorted(load_scores(result["run_dir"]).step.unique())
    assert steps[0] == 0 and len(steps) >= 4  # step 0 + at least 3 saves
    assert (tmp_path / "cot_study.png").stat().st_size > 10_000
    assert "CoT → Cross-task non-CoT" in Path(result["report"]).read_text(encoding="utf-8")
    assert list((tmp_path / "run" / "runs").rglob("events.out.tfevents.*"))


def test_cli_parses_demo():
    args = build_parser().parse_args(["demo", "--output-dir", "x", "--model", "some/model"])
    assert (args.output_dir, args.model, args.command) == ("x", "some/model", "demo")


@pytest.mark.slow
def test_demo_with_a_model_path_uses_the_real_loading_code(tmp_path):
    from swift_callbacks.assets.tiny import build_demo_assets

    model_dir = tmp_path / "local-model"
    build_demo_assets(model_dir)
    cfg = DemoConfig(output_dir=str(tmp_path / "out"), model=str(model_dir), epochs=0.2, save_every=4)
    result = run_demo(cfg)
    assert len(load_scores(result["run_dir"]).step.unique()) >= 3
