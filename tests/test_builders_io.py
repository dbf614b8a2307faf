"""Builder inputs and outputs: file types, column mapping, per-row rejects, atomic outputs, the cache on rerun,
the ``build`` command line (dry run, summary, errors) and the no-torch import guarantee."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

import pytest
from doubles import ScriptedBackend

from swift_callbacks import load_set
from swift_callbacks.builders import run_build
from swift_callbacks.builders.cli import add_build_parser
from swift_callbacks.builders.io import read_source
from swift_callbacks.builders.schema import STRATEGY_FIELDS, parse_mapping
from swift_callbacks.generation.runner import Generator


def cot_reply(req):
    """A CoT reply ending with the reference answer, which the scripted user message carries after 'it):\\n'."""
    reference = req.messages[-1][1].split("contain no explanation):\n", 1)[1].split("\n", 1)[0]
    return f"Thinking it through step by step. So the answer is {reference}."


def generator(reply=cot_reply, cache_dir=None):
    return Generator(ScriptedBackend(reply), cache_dir, progress=False)


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _write_rows(path, rows: list[dict]):
    return write_lines(path, [json.dumps(r).encode() for r in rows])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def row(**fields) -> bytes:
    return json.dumps(fields).encode("utf-8")


# -------------------------------------------------------------------------------------------- bad rows


def test_bad_rows_land_in_rejects_and_the_rest_completes(tmp_path):
    source = write_lines(tmp_path / "refs.jsonl", [
        row(id="a", query="What is 1 plus 1?", response="2"),
        row(id="b", query="What is 2 plus 2?"),                               # missing response
        row(id="c", query="   ", response="x"),                               # empty query
        row(id="d", query=5, response="5"),                                   # wrong type
        b'{"id": "e", "query": "caf\xe9?", "response": "x"}',                 # Latin-1 byte: not UTF-8
        b'{"id": "f", "query": ',                                             # not JSON
        b"",                                                                  # blank lines are skipped
        row(id="a", query="Again?", response="3"),                            # duplicate id
        row(query="No id here, 3 plus 4?", response="7"),                     # id: position among non-blank lines
        row(id="h", query="q", response="r", task=["list"]),                  # wrong type for task
        b'["not", "an", "object"]',
    ])  # fmt: skip
    out = tmp_path / "out" / "cot.jsonl"
    result = run_build("cot", source, out, generator=generator())
    rejects = read_jsonl(tmp_path / "out" / "cot.rejects.jsonl")
    got = {(r["source_id"], r["stage"], r["reason"]) for r in rejects}
    assert got == {
        ("b", "validate", "missing field"), ("c", "validate", "empty field"), ("d", "validate", "wrong type"),
        ("4", "read", "invalid UTF-8"), ("5", "read", "invalid JSON"), ("a", "validate", "duplicate id"),
        ("h", "validate", "wrong type"), ("9", "validate", "wrong type"),
    }  # fmt: skip
    by_id = {r["source_id"]: r for r in rejects}
    assert by_id["4"]["row"]["line"] == 5 and "\\xe9" in by_id["4"]["row"]["text"]
    assert "'query' must be a string, got int" in by_id["d"]["detail"]
    assert by_id["b"]["row"] == {"id": "b", "query": "What is 2 plus 2?"}
    assert set(rejects[0]) == {"source_id", "stage", "reason", "detail", "row"}
    assert [r["id"] for r in read_jsonl(out)] == ["a/cot", "7/cot"]
    assert result.stats.rows_in == 10 and result.stats.rows_out == 2
    assert load_set("cot", out).ids == ["a/cot", "7/cot"]
    assert sorted(os.listdir(tmp_path / "out")) == ["cot.jsonl", "cot.rejects.jsonl"]  # no temporary files left


def test_rows_missing_a_task_that_others_have_are_rejected(tmp_path):
    source = write_lines(tmp_path / "refs.jsonl", [row(query="q1?", response="1", task="t"),
                                                   row(query="q2?", response="2")])  # fmt: skip
    result = run_build("cot", source, tmp_path / "o.jsonl", generator=generator())
    assert [(r.source_id, r.reason) for r in result.rejects] == [("1", "missing task")]
    load_set("cot", tmp_path / "o.jsonl")  # all or none of the rows carry a task, as the probe-set loader needs


def test_csv_with_mapping_multiline_cells_and_a_bad_byte_row(tmp_path):
    path = tmp_path / "refs.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "answer", "category"])
        writer.writerow(["Sum 1 and 2.\nReply with a number.", "3", "math"])
        writer.writerow(["BAD_ROW", "x", "math"])
        writer.writerow(["Sum 2 and 2.", "4", ""])
    path.write_bytes(path.read_bytes().replace(b"BAD_ROW", b"bad \xff row"))
    mapping = "query=question,response=answer,task=category"
    result = run_build("cot", path, tmp_path / "o.jsonl", generator=generator(), mapping=mapping)
    assert [(r.source_id, r.stage, r.reason) for r in result.rejects] == [
        ("1", "read", "invalid UTF-8"), ("2", "validate", "missing task")]  # fmt: skip
    (out,) = read_jsonl(tmp_path / "o.jsonl")
    assert out["prompt"].startswith("Sum 1 and 2.\nReply with a number. Please output") and out["task"] == "math"


def test_parquet_input_and_column_lists(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"q": ["Which is red?"], "A": ["sky"], "B": ["blood"], "gold": ["B"], "topic": ["colors"]})
    pq.write_table(table, tmp_path / "mc.parquet")
    rows, rejects = read_source(tmp_path / "mc.parquet")
    assert rejects == [] and rows[0][1]["q"] == "Which is red?"
    gen = generator(lambda req: "Of all things people see daily, which one is red?")
    mapping = ["question=q,choices=A+B", "answer=gold,subject=topic"]  # repeated --map flags
    run_build("rules-apply", tmp_path / "mc.parquet", tmp_path / "mc.jsonl", generator=gen, mapping=mapping,
              rule_names=["Exaggeration"])  # fmt: skip
    (out,) = read_jsonl(tmp_path / "mc.exaggeration.jsonl")
    assert out["completion"] == " B. blood" and out["task"] == "colors"


def test_hub_dataset_ids_go_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"query": f"q{i}", "response": "r"} for i in range(5)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows, _ = read_source("someone/refs", split="validation", config="en", limit=2)
    assert calls == [("someone/refs", "en", "validation")] and [p for p, _ in rows] == [0, 1]
    read_source("someone/refs")
    assert calls[-1] == ("someone/refs", None, "train")


def test_missing_or_unknown_input_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_source(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"unknown input file type '\.txt'"):
        read_source(tmp_path / "x.txt")


@pytest.mark.parametrize(
    ("spec", "match"), [("query", "expected FIELD=COLUMN"), ("question=q", "unknown field 'question'"),
                        ("query=", "expected FIELD=COLUMN")]
)  # fmt: skip
def test_mapping_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_mapping(spec, STRATEGY_FIELDS)


# ----------------------------------------------------------------------------------- cache and atomicity


def test_rerun_after_failures_sends_only_what_is_missing(tmp_path):
    source = write_lines(tmp_path / "refs.jsonl", [row(id=str(i), query=f"What is {i} plus 0?", response=str(i))
                                                   for i in range(4)])  # fmt: skip
    cache, out = tmp_path / "cache", tmp_path / "cot.jsonl"

    def flaky(req):
        if req.key == "2/cot":
            raise ConnectionError("dropped")
        return cot_reply(req)

    first = run_build("cot", source, out, generator=generator(flaky, cache))
    assert [r.reason for r in first.rejects] == ["generation failed"] and first.stats.rows_out == 3
    gen = generator(cache_dir=cache)
    second = run_build("cot", source, out, generator=gen)
    assert [req.key for req in gen.backend.calls] == ["2/cot"]  # the finished three came from the cache
    assert second.stats.generation.cached == 3 and second.rejects == []
    assert [r["id"] for r in read_jsonl(out)] == ["0/cot", "1/cot", "2/cot", "3/cot"]


def test_a_crashed_build_leaves_earlier_outputs_intact(tmp_path):
    source = write_lines(tmp_path / "refs.jsonl", [row(query="q?", response="1")])
    out = tmp_path / "cot.jsonl"
    out.write_text("previous build\n")

    class Broken:
        backend = ScriptedBackend(cot_reply)

        def run(self, requests):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_build("cot", source, out, generator=Broken())
    assert out.read_text() == "previous build\n" and sorted(os.listdir(tmp_path)) == ["cot.jsonl", "refs.jsonl"]


# ------------------------------------------------------------------------------------------------- CLI


def parse(argv):
    parser = argparse.ArgumentParser(prog="swift-study")
    add_build_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
def no_backend_env(monkeypatch):
    for name in ("SWIFT_BASE_URL", "SWIFT_MODEL"):
        monkeypatch.delenv(name, raising=False)


def test_dry_run_prints_prompts_and_sends_nothing(tmp_path, capsys, no_backend_env, monkeypatch):
    source = write_lines(tmp_path / "refs.jsonl", [row(id="k", query="Form a phrase with K and S.", response="x"),
                                                   row(id="bad", response="y")])  # fmt: skip
    monkeypatch.chdir(tmp_path)
    args = parse(["build", "clarify", "--input", str(source), "--dry-run", "--lang", "zh"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "===== request 1/1: k/clarify =====" in printed and "Form a phrase with K and S." in printed
    assert "[system]" in printed and "[user]" in printed and "编号列表" in printed
    assert "dry run: 1 requests planned, nothing sent" in printed and "validate: missing field" in printed
    assert sorted(os.listdir(tmp_path)) == ["refs.jsonl"]  # no output, no rejects file, no cache


def test_trl_probe_sets_are_read_as_they_are_and_a_dry_run_that_sends_nothing_fails(tmp_path, capsys, no_backend_env):
    """A probe set in any TRL form the callback reads is a builder input; rows with other fields get the field
    named, the fields present and the --map that would read them, and a dry run planning nothing exits 1."""
    from swift_callbacks.cli import main

    trl = _write_rows(tmp_path / "trl.jsonl", [
        {"id": "t", "prompt": "What is 2 plus 3?", "completion": " 5"},
        {"id": "c", "prompt": [{"role": "user", "content": "Reverse gold."}],
         "completion": [{"role": "assistant", "content": "dlog"}]},
        {"id": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"},
                                 {"role": "assistant", "content": "A"}]},
    ])  # fmt: skip
    assert main(["build", "cot", "--input", str(trl), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: 3 requests planned" in out
    assert "What is 2 plus 3?" in out and "Reverse gold." in out and "Q?" in out
    other = _write_rows(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    assert main(["build", "cot", "--input", str(other), "--dry-run"]) == 1
    captured = capsys.readouterr()
    assert "field 'query' is missing (the row has ['answer', 'question']; read it from one of them with --map " \
        "query=COLUMN)" in captured.out  # fmt: skip
    assert "no request would be sent" in captured.err
    assert main(["build", "cot", "--input", str(other), "--dry-run", "--map", "query=question,response=answer"]) == 0
    turns = [{"role": role, "content": text} for role, text in zip(["user", "assistant"] * 2, "abcd", strict=True)]
    multi = _write_rows(tmp_path / "multi.jsonl", [{"messages": turns}])
    assert main(["build", "cot", "--input", str(multi), "--dry-run"]) == 1
    assert "cannot be read from the row's chat messages" in capsys.readouterr().out


def test_map_of_one_field_keeps_the_trl_reading_of_the_other_and_reads_mapped_chat_columns(tmp_path, capsys):
    """--map of the query alone still reads the response from TRL's completion; a response column of chat
    messages is read as its last assistant message; chat messages without one are named."""
    from swift_callbacks.cli import main

    rows = _write_rows(tmp_path / "mixed.jsonl", [
        {"id": "a", "question": "What is 4 plus 4?", "prompt": "ignored", "completion": " 8"},
        {"id": "b", "q": "Spell cat.", "reply": [{"role": "assistant", "content": "c-a-t"}]},
        {"id": "c", "q": "Spell dog.", "reply": [{"role": "user", "content": "no answer here"}]},
    ])  # fmt: skip
    assert main(["build", "cot", "--input", str(rows), "--dry-run", "--map", "query=question", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "What is 4 plus 4?" in out and "ignored" not in out and "dry run: 1 requests planned" in out
    assert main(["build", "cot", "--input", str(rows), "--dry-run", "--map", "query=q,response=reply"]) == 0
    out = capsys.readouterr().out
    assert "Spell cat." in out and "dry run: 1 requests planned" in out
    assert "field 'response' is mapped to chat messages with roles ['user'], which hold no single assistant " \
        "answer to read" in out  # fmt: skip


def test_cli_build_prints_summary_and_reuses_the_cache(tmp_path, capsys, monkeypatch):
    from swift_callbacks.generation import factory

    source = write_lines(tmp_path / "refs.jsonl", [row(query="What is 1 plus 1?", response="2", task="t"),
                                                   row(query="What is 2 plus 2?", response="5", task="t"),
                                                   row(query="", response="5", task="t")])  # fmt: skip
    backend = ScriptedBackend(lambda req: "Adding. So the answer is 2." if "1 plus 1" in req.messages[-1][1] else "4")
    monkeypatch.setattr(factory, "backend_from_args", lambda args: backend)
    argv = ["build", "cot", "--input", str(source), "--output", str(tmp_path / "cot.jsonl"),
            "--cache-dir", str(tmp_path / "cache"), "--format", "messages"]  # fmt: skip
    args = parse(argv)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    for line in ["rows in: 3", "requests: 2", "rows out: 1", "rejects: 2", "1  check: answer mismatch",
                 "1  validate: empty field", "2 requests: 0 cached, 2 sent, 2 ok, 0 failed", "wrote "]:  # fmt: skip
        assert line in printed, line
    assert load_set("cot", tmp_path / "cot.jsonl").format == "messages"
    args = parse(argv)
    assert args.func(args) == 0
    assert "2 requests: 2 cached, 0 sent" in capsys.readouterr().out and len(backend.calls) == 2


@pytest.mark.parametrize(
    ("kind", "extra", "message"),
    [("cot", [], "--output is required"),
     ("cot", ["--dry-run", "--map", "qry=question"], "unknown field 'qry'"),
     ("cot", ["--dry-run", "--templates", "missing.yaml"], "cannot read templates file"),
     ("cot", ["--dry-run", "--rules", "r.yaml"], "apply to rules-extract and rules-apply, not to 'cot'"),
     ("rules-apply", ["--dry-run", "--rules", "missing.yaml"], "cannot read rules file"),
     ("rules-apply", ["--dry-run", "--rule", "Nope"], "unknown rules ['Nope']")],
)  # fmt: skip
def test_cli_configuration_errors(tmp_path, capsys, kind, extra, message):
    from swift_callbacks.cli import main

    source = write_lines(tmp_path / "refs.jsonl", [row(query="q", response="r")])
    assert main(["build", kind, "--input", str(source), *extra]) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert message in err and err.startswith("swift-study build: error:") and "Traceback" not in err


def test_cli_exits_nonzero_when_nothing_was_built(tmp_path, capsys, monkeypatch):
    from swift_callbacks.generation import factory

    source = write_lines(tmp_path / "refs.jsonl", [row(query="q", response="1")])
    monkeypatch.setattr(factory, "backend_from_args", lambda args: ScriptedBackend(lambda req: "So it is 2."))
    args = parse(["build", "cot", "--input", str(source), "--output", str(tmp_path / "o.jsonl"), "--no-cache"])
    assert args.func(args) == 1


# ------------------------------------------------------------------------------------------- no torch


def test_builders_import_without_torch():
    code = (
        "import sys, argparse\n"
        "import swift_callbacks.builders, swift_callbacks.builders.cli\n"
        "p = argparse.ArgumentParser(); swift_callbacks.builders.cli.add_build_parser(p.add_subparsers())\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_bom_at_the_start_of_json_files_loses_no_rows(tmp_path):
    row = {"query": "What is 1+1?", "response": "2"}
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps(row) + "\r\n").encode() * 2)
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([row, row]).encode())
    for name in ("bom.jsonl", "bom.json"):
        rows, rejects = read_source(tmp_path / name)
        assert [r for _, r in rows] == [row, row] and rejects == [], name


def test_csv_cells_over_128_kib_are_read_and_csv_errors_become_rejects(tmp_path, monkeypatch):
    import swift_callbacks.builders.io as builders_io

    path = tmp_path / "big.csv"
    path.write_text('query,response\n"' + "x" * 200_000 + '",2\nok?,2\n', encoding="utf-8")
    rows, rejects = read_source(path)
    assert [len(r["query"]) for _, r in rows] == [200_000, 3] and rejects == []

    monkeypatch.setattr(builders_io, "_CSV_FIELD_LIMIT", 1000)  # a cell the reader refuses: one reject, no crash
    rows, rejects = read_source(path)
    assert [r["query"] for _, r in rows] == ["ok?"]
    assert [(r.stage, r.reason) for r in rejects] == [("read", "invalid CSV")]


def test_outputs_follow_the_umask(tmp_path):
    """Atomic writes go through a temporary file (mode 0600); the output gets the mode a plain open() would."""
    from swift_callbacks.builders.io import write_jsonl

    old = os.umask(0o022)
    try:
        path = write_jsonl(tmp_path / "o.jsonl", [{"a": 1}])
        os.umask(0o077)
        private = write_jsonl(tmp_path / "p.jsonl", [{"a": 1}])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and private.stat().st_mode & 0o777 == 0o600


def test_rows_of_mixed_formats_read_with_null_columns():
    """Parquet and CSV give every row every column: a null column of another format is absent, not a format."""
    from swift_callbacks.builders.schema import validate_rows

    rows = [{"messages": None, "prompt": "What is 2+3?", "completion": " 5", "query": None, "response": None},
            {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}], "prompt": None,
             "completion": None, "query": None, "response": None},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                          {"role": "assistant", "content": "A"}]}]  # fmt: skip
    valid, rejects = validate_rows(list(enumerate(rows)), STRATEGY_FIELDS)
    assert [r.values for r in valid] == [{"query": "What is 2+3?", "response": "5"}, {"query": "Q?", "response": "A"}]
    assert len(rejects) == 1 and "a message's content is not text" in rejects[0].detail


def test_choices_as_a_python_list_literal_are_read():
    """MMLU exports write choices as a Python list literal ("['a', 'b']"), as JSON text does for CSV."""
    from swift_callbacks.builders.schema import CHOICE_FIELDS, validate_rows

    rows = [{"question": "q", "choices": "['Rome', 'Paris']", "answer": 1},
            {"question": "q", "choices": '["Rome", "Paris"]', "answer": "B"},
            {"question": "q", "choices": "nonsense", "answer": 0}]  # fmt: skip
    valid, rejects = validate_rows(list(enumerate(rows)), CHOICE_FIELDS)
    assert [r.values["choices"] for r in valid] == [["Rome", "Paris"]] * 2
    assert [r.reason for r in rejects] == ["wrong type"] and "JSON / Python list text" in rejects[0].detail
