"""The copy-paste example runs as documented, on a local model directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from swift_callbacks import load_scores
from swift_callbacks.assets.tiny import build_demo_assets, load_rows

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.slow
def test_add_callback_example(tmp_path):
    build_demo_assets(tmp_path / "model")
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": r["prompt"], "completion": r["completion"]} for r in load_rows("base")[:64]],
    )
    probe = write_jsonl(tmp_path / "cot.jsonl", load_rows("cot_study_z_cot"))
    evals = write_jsonl(tmp_path / "qa.jsonl", load_rows("cot_study_z_similar"))
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "examples" / "add_callback_to_sfttrainer.py"), "--model", str(tmp_path / "model"),
           "--output-dir", str(out), "--train", train, "--probe", f"cot={probe}", "--eval", f"qa={evals}",
           "--save-steps", "2", "--max-steps", "4"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    scores = load_scores(out)
    assert list(scores.step) == [2, 4] and scores.n_in.tolist() == [12, 12]
