"""The README's quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import torch_threads

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quick start") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_quick_start_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with torch_threads(1):
        exec(compile(quick_start(), "README quick start", "exec"), {})
    assert "s_cross" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out" / "swift_influence" / "pairs").iterdir()) == [
        "step-000000020.parquet", "step-000000040.parquet", "step-000000060.parquet",
    ]  # fmt: skip
