"""Resuming ScaleQuest stages: a stage process killed mid-way and rerun sends only what it had no answer for and
writes each row exactly once; the pipeline runner skips complete stages and reruns changed ones; config errors
name their key path."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from chat_server import ChatServer

from swift_callbacks.builders.scalequest import DEFAULT_PROMPTS, ConfigError, StageError, run_pipeline
from swift_callbacks.builders.scalequest.cli import main as scalequest_main
from swift_callbacks.builders.scalequest.config import parse_pipeline_config
from swift_callbacks.generation.cache import CACHE_FILENAME

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "scalequest" / "data"
QUESTIONS = [{"id": f"q{i:02d}", "question": f"Ann has {i + 2} pens and buys {i} more. How many pens?"}
             for i in range(24)]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def judge_content(question: str) -> str:
    return DEFAULT_PROMPTS.solvability_judge.replace("{question}", question)


def stage_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "swift_callbacks.builders.scalequest", *args]


def cached_answers(cache: Path) -> int:
    """Answers stored in a generation cache so far (WAL mode lets us read while the stage writes)."""
    if not (cache / CACHE_FILENAME).exists():
        return 0
    with contextlib.closing(sqlite3.connect(cache / CACHE_FILENAME)) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
        except sqlite3.OperationalError:  # the table is not created yet
            return 0


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_killed_stage_resumes_without_resending_or_losing_rows(tmp_path):
    source = write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)
    replies = {judge_content(q["question"]): f"Checked.\n{'Yes' if i % 3 else 'No'}" for i, q in enumerate(QUESTIONS)}
    output, cache = tmp_path / "solvable.jsonl", tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with ChatServer(delay=0.25, replies=replies) as server:
        args = ("filter-solvable", "--input", str(source), "--output", str(output), "--base-url", server.base_url,
                "--model", "judge", "--cache-dir", str(cache), "--max-concurrency", "2",
                "--max-retries", "0")  # fmt: skip
        proc = subprocess.Popen(stage_command(*args), env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        try:
            wait_for(lambda: cached_answers(cache) >= 6 or proc.poll() is not None)
            assert proc.poll() is None, proc.stderr.read().decode()
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage's own process group only (start_new_session)
            proc.wait()
        assert not output.exists()  # nothing half-written: outputs are written whole at the end
        cached = cached_answers(cache)
        assert 6 <= cached < len(QUESTIONS)

        server.delay = 0.0
        sent_before = server.total
        done = subprocess.run(stage_command(*args), env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert server.total - sent_before == len(QUESTIONS) - cached  # only what had no answer yet
        resent = [q["id"] for q in QUESTIONS if server.count(judge_content(q["question"])) > 1]
        assert len(resent) <= 2  # at most the requests in flight at the kill (concurrency 2) were paid twice

    rows, rejects = read_jsonl(output), read_jsonl(tmp_path / "solvable.rejects.jsonl")
    ids = [r["id"] for r in rows] + [r["source_id"] for r in rejects]
    assert sorted(ids) == [q["id"] for q in QUESTIONS]  # every row exactly once
    assert len(rows) == 16 and {r["reason"] for r in rejects} == {"judged unsolvable"}
    stats = json.loads((tmp_path / "solvable.stats.json").read_text())
    assert stats["generation"]["judge"]["cached"] == cached and stats["rows_in"] == 24


# ------------------------------------------------------------------------------------------------ the runner


def base_config(tmp_path: Path, questions: Path) -> dict:
    return {
        "models": {"teacher": "scripted:arithmetic", "tiny": "tiny:hidden_size=32,num_layers=1,seed=0"},
        "cache_dir": str(tmp_path / "cache"),
        "stages": {
            "qft-data": {"input": str(DATA / "seed_problems.jsonl")},
            "qft": {"model": "tiny", "training": {"max_steps": 1}},
            "qpo-pairs": {"rewriter": "teacher"},
            "filter-language": {"input": str(questions)},
            "filter-solvable": {"judge": "teacher"},
            "difficulty": {"solver": "teacher", "scorer_model": "tiny"},
            "respond": {"model": "teacher", "n": 3},
            "reward-select": {"reward_model": "teacher"},
            "decontaminate": {"eval_sets": [{"path": str(DATA / "eval_problems.jsonl")}]},
        },
    }


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_runner_skips_complete_stages_and_reruns_what_changed(tmp_path, capsys):
    questions = write_jsonl(tmp_path / "questions.jsonl", [*QUESTIONS[:6], {"id": "x", "question": "No numbers?"}])
    out = tmp_path / "out"
    data = base_config(tmp_path, questions)
    data["stages"]["respond"]["input"] = str(out / "filter-solvable.jsonl")  # skip difficulty: nothing to train here
    config = write_config(tmp_path / "pipeline.yaml", data)
    stages = ["filter-language", "filter-solvable", "respond"]

    first = run_pipeline(config, out, stages)
    assert list(first) == stages and first["filter-solvable"].rows_out == 6 and first["respond"].rows_in == 18
    stamps = {name: (out / f"{name}.stats.json").stat().st_mtime_ns for name in stages}
    capsys.readouterr()

    again = run_pipeline(config, out, stages)
    assert "[respond] complete, skipped" in capsys.readouterr().out
    assert {name: (out / f"{name}.stats.json").stat().st_mtime_ns for name in stages} == stamps
    assert {n: s.fingerprint for n, s in again.items()} == {n: s.fingerprint for n, s in first.items()}
    # A skipped stage's stats read back whole: the same file, the same summary row.
    assert {n: s.to_dict() for n, s in again.items()} == {n: s.to_dict() for n, s in first.items()}
    assert again["respond"].to_dict() == json.loads((out / "respond.stats.json").read_text())

    data["stages"]["respond"]["n"] = 2  # a changed setting reruns that stage only
    run_pipeline(write_config(config, data), out, stages)
    printed = capsys.readouterr().out
    assert "[filter-solvable] complete, skipped" in printed and "[respond] running" in printed
    assert json.loads((out / "respond.stats.json").read_text())["rows_in"] == 12
    summary = json.loads((out / "pipeline.stats.json").read_text())
    assert list(summary) == stages

    write_jsonl(questions, QUESTIONS[:3])  # a changed input reruns everything after it
    rerun = run_pipeline(config, out, stages)
    assert rerun["filter-language"].rows_in == 3 and rerun["respond"].rows_in == 6


def test_runner_reruns_a_stage_whose_generations_failed_asking_only_the_failed(tmp_path, capsys):
    questions = write_jsonl(tmp_path / "questions.jsonl", QUESTIONS[:6])
    out = tmp_path / "out"
    replies = {judge_content(q["question"]): "Checked.\nYes" for q in QUESTIONS[:6]}
    with ChatServer(replies=replies) as server:
        server.inject(judge_content(QUESTIONS[2]["question"]), "503")  # fails on the first run only
        data = base_config(tmp_path, questions)
        data["stages"]["filter-solvable"]["judge"] = {"backend": "openai", "base_url": server.base_url,
                                                      "model": "judge", "max_retries": 0, "timeout": 5}  # fmt: skip
        config = write_config(tmp_path / "pipeline.yaml", data)
        stages = ["filter-language", "filter-solvable"]
        first = run_pipeline(config, out, stages)["filter-solvable"]
        assert first.rows_out == 5 and first.dropped == {"generate: generation failed": 1}
        sent = server.total
        capsys.readouterr()

        again = run_pipeline(config, out, stages)["filter-solvable"]  # the server answers now
        printed = capsys.readouterr().out
        assert "[filter-language] complete, skipped" in printed and "[filter-solvable] running" in printed
        assert server.total - sent == 1  # only the failed request is asked again; the cache answers the rest
        assert again.rows_out == 6 and again.dropped == {}
        capsys.readouterr()
        run_pipeline(config, out, stages)
        assert "[filter-solvable] complete, skipped" in capsys.readouterr().out


def test_a_stage_whose_every_request_failed_stops_the_pipeline(tmp_path, capsys):
    """Every request of filter-solvable fails (a 503 each time, not a cause the breaker stops on): the stage is not
    complete, the pipeline stops there with exit 1 and one line, and no later stage runs on an empty file."""
    from swift_callbacks.builders.scalequest.cli import run_from_args

    questions = write_jsonl(tmp_path / "questions.jsonl", QUESTIONS[:4])
    out = tmp_path / "out"
    with ChatServer() as server:
        for q in QUESTIONS[:4]:
            server.inject(judge_content(q["question"]), "503", forever=True)
        data = base_config(tmp_path, questions)
        data["stages"]["filter-solvable"]["judge"] = {"backend": "openai", "base_url": server.base_url,
                                                      "model": "judge", "max_retries": 0, "timeout": 5}  # fmt: skip
        config = write_config(tmp_path / "pipeline.yaml", data)
        args = argparse.Namespace(config=str(config), output_dir=str(out), overrides=[],
                                  stages="filter-language,filter-solvable")  # fmt: skip
        assert run_from_args(args) == 1
    err = capsys.readouterr().err
    assert "stage filter-solvable: every generation request failed (e.g. " in err and "not complete" in err
    assert not (out / "pipeline.stats.json").exists()  # the pipeline stopped at the stage


def test_runner_reruns_decontaminate_when_an_eval_set_file_changes(tmp_path, capsys):
    rows = write_jsonl(tmp_path / "final.jsonl", QUESTIONS[:4])
    eval_set = write_jsonl(tmp_path / "eval.jsonl", [{"question": "Something else entirely, with 7 words."}])
    data = base_config(tmp_path, rows)
    data["stages"]["decontaminate"] = {"input": str(rows), "eval_sets": [{"path": str(eval_set)}]}
    config = write_config(tmp_path / "pipeline.yaml", data)
    out = tmp_path / "out"
    assert run_pipeline(config, out, ["decontaminate"])["decontaminate"].rows_out == 4
    capsys.readouterr()
    run_pipeline(config, out, ["decontaminate"])
    assert "[decontaminate] complete, skipped" in capsys.readouterr().out

    write_jsonl(eval_set, [{"question": QUESTIONS[1]["question"]}])  # same path and settings, new content
    again = run_pipeline(config, out, ["decontaminate"])["decontaminate"]
    assert "[decontaminate] running" in capsys.readouterr().out
    assert again.rows_out == 3 and [r["id"] for r in read_jsonl(out / "decontaminate.jsonl")] == ["q00", "q02", "q03"]


def test_runner_names_the_missing_input_and_unknown_stages(tmp_path):
    config = write_config(tmp_path / "p.yaml", base_config(tmp_path, tmp_path / "questions.jsonl"))
    # A configured input is checked before any stage runs, and the error names its key path.
    with pytest.raises(ConfigError, match=r"^stages\.filter-language\.input: file .* not found"):
        run_pipeline(config, tmp_path / "out", ["filter-language"])
    # So is the output of an earlier stage this run does not include (a user error, before any stage runs).
    with pytest.raises(ConfigError, match=r"^stages\.filter-solvable: reads the output of stage 'filter-language'"):
        run_pipeline(config, tmp_path / "out", ["filter-solvable"])
    with pytest.raises(StageError, match="uses the model of stage 'qft', which has not run yet"):
        run_pipeline(config, tmp_path / "out", ["qpo-pairs"])
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['respnd'\]"):
        run_pipeline(config, tmp_path / "out", ["respnd"])


def test_runner_checks_files_before_any_stage_runs_and_takes_list_overrides(tmp_path):
    rows = write_jsonl(tmp_path / "final.jsonl", QUESTIONS[:4])
    data = base_config(tmp_path, rows)
    data["stages"]["decontaminate"] = {"input": str(rows), "eval_sets": [{"path": "missing.jsonl"}]}
    config = write_config(tmp_path / "pipeline.yaml", data)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"^stages\.decontaminate\.eval_sets\[0\]\.path: file .* not found"):
        run_pipeline(config, out, ["filter-language", "decontaminate"])
    assert not (out / "filter-language.stats.json").exists()  # nothing ran
    eval_set = write_jsonl(tmp_path / "eval.jsonl", [{"question": QUESTIONS[1]["question"]}])
    argv = ["run", "--config", str(config), "--output-dir", str(out), "--stages", "decontaminate", "--set",
            f"stages.decontaminate.eval_sets[0].path={eval_set}", "--set", "stages.decontaminate.n=5"]  # fmt: skip
    assert scalequest_main(argv) == 0
    stats = json.loads((out / "decontaminate.stats.json").read_text())
    assert stats["rows_out"] == 3 and stats["settings"]["n"] == 5


def _mutate(data: dict, path: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, leaf = path.split("/")
    target = data
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target.setdefault(key, {})
    if value is _DELETE:
        del target[leaf]
    else:
        target[leaf] = value
    return data


_DELETE = object()
CONFIG_ERRORS = [
    ("stage", {}, "stage: unknown key; did you mean 'stages'?"),
    ("stages/respnd", {}, "stages.respnd: unknown key; did you mean 'respond'?"),
    ("stages/respond/samplng", {}, "stages.respond.samplng: unknown key; did you mean 'sampling'?"),
    ("stages/respond/sampling", {"temprature": 1}, "stages.respond.sampling.temprature: unknown key"),
    ("stages/respond/n", "five", "stages.respond.n: expected an integer"),
    ("stages/respond/n", 0, "stages.respond: n must be at least 1"),
    ("stages/respond/sampling", {"top_p": 1.5}, "stages.respond.sampling: invalid sampling settings"),
    ("stages/qft/training", {"learnig_rate": 1}, "stages.qft.training.learnig_rate: unknown SFTConfig argument"),
    ("stages/qpo", {"training": {"bta": 0.1}}, "stages.qpo.training.bta: unknown DPOConfig argument; did you mean"),
    ("stages/difficulty/scorer", {"trainig": {}}, "stages.difficulty.scorer.trainig: unknown key"),
    ("stages/difficulty/scorer", {"training": {"lr": 1}}, "stages.difficulty.scorer.training.lr: unknown"),
    ("stages/decontaminate/eval_sets", [{"path": "x", "feilds": []}], "stages.decontaminate.eval_sets[0].feilds:"),
    ("stages/filter-solvable/judge", _DELETE, "stages.filter-solvable.judge: required"),
    ("stages/qft-data/input", _DELETE, "stages.qft-data.input: required"),
    ("models/teacher", {"backend": "openai", "model": "m"}, "models.teacher.base_url: required"),
    ("models/teacher", {"backend": "vllm", "model": "m", "engin": {}}, "models.teacher.engin: unknown key"),
    ("models/teacher", {"backend": "gpt"}, "models.teacher.backend: expected one of"),
    (
        "models/tiny",
        "tiny:hiden_size=3",
        "models.tiny: 'hiden_size' in the tiny: spec is unknown; did you mean 'hidden_size'?",
    ),
    ("stages/respond/model", "openai:gpt", "stages.respond.model: give an OpenAI-compatible server as a mapping"),
]


@pytest.mark.parametrize(
    ("path", "value", "message"), CONFIG_ERRORS, ids=[c[0] + ":" + c[2][-12:] for c in CONFIG_ERRORS]
)
def test_config_errors_name_the_key_path(tmp_path, path, value, message):
    data = _mutate(base_config(tmp_path, tmp_path / "q.jsonl"), path, value)
    with pytest.raises(ConfigError) as err:
        parse_pipeline_config(data, tmp_path / "pipeline.yaml")
    assert str(err.value).startswith(message) or message in str(err.value), str(err.value)


def test_shipped_configs_are_valid():
    from swift_callbacks.builders.scalequest import STAGE_ORDER, load_pipeline_config

    for name in ("pipeline_paper.yaml", "pipeline_tiny_cpu.yaml"):
        config = load_pipeline_config(REPO / "recipes" / "scalequest" / name)
        assert list(config.stages) == list(STAGE_ORDER)
    paper = load_pipeline_config(REPO / "recipes" / "scalequest" / "pipeline_paper.yaml").stages
    assert paper["generate"].settings.sampling.temperature == 1.0 and paper["generate"].settings.sampling.top_p == 0.99
    assert paper["respond"].settings.n == 5 and paper["decontaminate"].settings.n == 13
    assert paper["qpo"].settings.training["gradient_accumulation_steps"] * 8 == 128


def test_stage_command_exit_codes(tmp_path, capsys):
    rows = write_jsonl(tmp_path / "in.jsonl", [{"id": "1", "question": "ok?"}, {"id": "2", "question": "é?"}])
    assert scalequest_main(["filter-language", "--input", str(rows), "--output", str(tmp_path / "o.jsonl")]) == 0
    assert json.loads((tmp_path / "o.stats.json").read_text())["rows_out"] == 1
    assert scalequest_main(["respond", "--input", str(rows), "--output", str(tmp_path / "r.jsonl")]) == 2
    assert "no model for model" in capsys.readouterr().err
    missing = str(tmp_path / "missing.jsonl")
    # A missing input is the user's mistake: one line, exit 2 (exit 1 is left for a stage that fails while running).
    assert scalequest_main(["filter-language", "--input", missing, "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    argv = ["respond", "--input", str(rows), "--output", str(tmp_path / "r.jsonl"), "--spec", "scripted:arithmetic",
            "--set", "n=2", "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    assert scalequest_main(argv) == 0
    assert json.loads((tmp_path / "r.stats.json").read_text())["rows_in"] == 4
