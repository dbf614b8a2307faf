"""The tiny CPU ScaleQuest pipeline (recipes/scalequest/pipeline_tiny_cpu.yaml), every stage end to end, then a
rerun that skips every stage. Its teacher is the stand-in server of scripts/chat_server.py, over real HTTP."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from chat_server import ChatServer, arithmetic_responder

from swift_callbacks.builders.scalequest import STAGE_ORDER, run_pipeline

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes" / "scalequest" / "pipeline_tiny_cpu.yaml"
TRAINING = ("qft", "qpo")


@pytest.fixture(autouse=True)
def _one_thread():
    # Models this small run fastest on one thread; spinning OpenMP threads slow a busy 2-core machine down.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def teacher_url():
    """The recipe's teacher: the arithmetic stand-in server, on a free port (the recipe's own may be taken)."""
    with ChatServer(responder=arithmetic_responder) as server:
        yield server.base_url


@pytest.mark.slow
def test_tiny_cpu_pipeline_runs_every_stage_end_to_end(tmp_path, capsys, teacher_url):
    out = tmp_path / "run"
    teacher = [f"models.teacher.base_url={teacher_url}"]
    stats = run_pipeline(CONFIG, out, overrides=teacher)
    assert list(stats) == list(STAGE_ORDER)
    for name, s in stats.items():
        assert s.complete and (out / f"{name}.stats.json").is_file() and (out / f"{name}.rejects.jsonl").is_file()
        assert s.rows_in == s.rows_out + s.dropped_total, name  # every drop counted with a reason
        assert len(read_jsonl(out / f"{name}.rejects.jsonl")) == s.dropped_total, name
        if name not in TRAINING:
            assert len(read_jsonl(out / f"{name}.jsonl")) == s.rows_out, name
    assert (out / "qft" / "config.json").is_file() and (out / "qpo" / "config.json").is_file()

    # Each stage reads what the one before wrote.
    chain = [("qft-data", "qft"), ("qpo-pairs", "qpo"), ("generate", "filter-language"),
             ("filter-language", "filter-solvable"), ("filter-solvable", "difficulty"), ("respond", "reward-select"),
             ("reward-select", "decontaminate")]  # fmt: skip
    for before, after in chain:
        assert stats[after].rows_in == stats[before].rows_out, (before, after)
    assert stats["respond"].rows_in == stats["difficulty"].rows_out * 5
    assert stats["qpo-pairs"].rows_out > 0 and stats["decontaminate"].rows_out > 0

    # The paper's statistics are there.
    metrics = {name: s.metrics for name, s in stats.items()}
    assert 0 <= stats["filter-language"].kept_ratio <= 1
    assert 0 <= metrics["filter-solvable"]["solvable_ratio"] <= 1
    assert sum(metrics["difficulty"]["fail_rate_histogram"]["counts"]) == metrics["difficulty"]["labelled"]
    assert len(metrics["difficulty"]["predicted_histogram"]["counts"]) == 5
    assert 0 < metrics["respond"]["answer_presence_ratio"] <= 1
    assert set(metrics["reward-select"]["reward_selected"]) == {"count", "min", "median", "max", "mean"}
    assert metrics["decontaminate"]["contamination_ratio"] is not None
    final = read_jsonl(out / "decontaminate.jsonl")
    assert all(r["messages"][1]["content"] == r["response"] and "\\boxed{" in r["response"] for r in final)
    summary = json.loads((out / "pipeline.stats.json").read_text())
    assert list(summary) == list(STAGE_ORDER)
    assert "solvable_ratio" in capsys.readouterr().out  # the end-of-run table

    started = time.perf_counter()
    # Every stage complete: all skipped, nothing retrained or regenerated.
    again = run_pipeline(CONFIG, out, overrides=teacher)
    assert time.perf_counter() - started < 10
    assert {n: s.fingerprint for n, s in again.items()} == {n: s.fingerprint for n, s in stats.items()}
    assert capsys.readouterr().out.count("complete, skipped") == len(STAGE_ORDER)

    # Real contamination: an evaluation set holding one of the final questions (reworded in case and punctuation).
    # Only decontaminate reruns, and it removes exactly the rows of that question.
    selected = read_jsonl(out / "reward-select.jsonl")
    leaked = selected[0]["question"]
    (tmp_path / "data").symlink_to(CONFIG.parent / "data", target_is_directory=True)
    (tmp_path / "leak.jsonl").write_text(json.dumps({"id": None, "question": leaked.upper() + " ?"}) + "\n")
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    config["stages"]["decontaminate"]["eval_sets"].append({"path": "leak.jsonl", "name": "leak"})
    config["models"]["teacher"]["base_url"] = teacher_url
    leaky = tmp_path / "pipeline_leak.yaml"
    leaky.write_text(yaml.safe_dump(config), encoding="utf-8")
    capsys.readouterr()
    rerun = run_pipeline(leaky, out)
    printed = capsys.readouterr().out
    assert printed.count("complete, skipped") == len(STAGE_ORDER) - 1 and "[decontaminate] running" in printed
    removed = sum(1 for r in selected if r["question"] == leaked)
    assert rerun["decontaminate"].metrics["contaminated_by_set"]["leak"] >= removed >= 1
    assert (
        rerun["decontaminate"].rows_out
        == stats["decontaminate"].rows_out - rerun["decontaminate"].metrics["contaminated_by_set"]["leak"]
    )
    assert leaked not in {r["question"] for r in read_jsonl(out / "decontaminate.jsonl")}
    rejects = read_jsonl(out / "decontaminate.rejects.jsonl")
    assert any(r["reason"] == "contaminated: leak" and r["row"]["question"] == leaked for r in rejects)
