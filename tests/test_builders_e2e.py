"""End to end: ``swift-study build cot`` through OpenAICompatibleBackend against the local test chat server."""

from __future__ import annotations

import argparse
import json

from chat_server import ChatServer

from swift_callbacks import load_set
from swift_callbacks.builders import load_templates
from swift_callbacks.builders.cli import add_build_parser

REFS = [
    {"id": "add", "query": "What is 38 plus 49?", "response": "87", "task": "math"},
    {"id": "cap", "query": "Name the capital of France.", "response": "Paris", "task": "geo"},
    {"id": "sub", "query": "What is 9 minus 4?", "response": "5", "task": "math"},
]
REPLIES = {
    "add": "30 plus 40 is 70, and 8 plus 9 is 17; 70 plus 17 is 87. So the answer is 87.",
    "cap": "France's government sits in its capital city. So the answer is Paris.",
    "sub": "Taking 4 from 9 leaves 6. So the answer is 6.",  # wrong on purpose: must be rejected
}


def user_message(ref: dict) -> str:
    """The user message the cot builder sends for a reference (the server answers by it)."""
    templates = load_templates("en")
    query = ref["query"] + templates.text("cot", "directive")
    return templates.messages("cot", query=query, response=ref["response"])[-1]["content"]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="swift-study")
    add_build_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_build_cot_through_an_openai_compatible_server(tmp_path, capsys):
    source = tmp_path / "refs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in REFS), encoding="utf-8")
    out = tmp_path / "cot.jsonl"
    replies = {user_message(ref): REPLIES[ref["id"]] for ref in REFS}
    with ChatServer(replies=replies) as server:
        server.inject(user_message(REFS[1]), "500")  # one transient failure, retried by the backend
        argv = ["build", "cot", "--input", str(source), "--output", str(out), "--base-url", server.base_url,
                "--model", "test-model", "--cache-dir", str(tmp_path / "cache"), "--max-retries", "2"]  # fmt: skip
        assert run_cli(argv) == 0
        assert server.total == 4  # three requests, one retried
        assert "3 requests: 0 cached, 3 sent, 3 ok, 0 failed" in capsys.readouterr().out
        example_set = load_set("cot", out)
        assert example_set.ids == ["add/cot", "cap/cot"] and example_set.tasks == ["math", "geo"]
        row = example_set.rows[0]
        assert row["completion"] == " " + REPLIES["add"]
        assert (row["generator_backend"], row["generator_model"]) == ("openai", "test-model")
        rejects = [json.loads(line) for line in (tmp_path / "cot.rejects.jsonl").read_text().splitlines()]
        assert [(r["source_id"], r["reason"]) for r in rejects] == [("sub", "answer mismatch")]
        system = server.bodies[0]["messages"][0]
        assert system["role"] == "system" and server.bodies[0]["temperature"] == 0.0

        assert run_cli(argv) == 0  # a rerun regenerates nothing
        assert server.total == 4
        assert "3 requests: 3 cached, 0 sent" in capsys.readouterr().out
    assert out.read_text(encoding="utf-8").count("\n") == 2


def test_a_failure_that_would_repeat_for_every_request_stops_the_build(tmp_path, capsys):
    """A rejected key, a wrong model or path, a server that is down: the build stops after a few requests with one
    line naming the cause (exit 2), instead of sending every request and writing one reject per row; answers
    received before are kept in the cache."""
    import socket

    from swift_callbacks.cli import main

    refs = [{"id": f"r{i}", "query": f"What is {i} plus 1?", "response": str(i + 1)} for i in range(40)]
    source = tmp_path / "refs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in refs), encoding="utf-8")
    base = ["build", "cot", "--input", str(source), "--output", str(tmp_path / "out.jsonl"), "--model", "m",
            "--cache-dir", str(tmp_path / "cache"), "--max-retries", "0", "--max-concurrency", "2"]  # fmt: skip
    for status, words in (("401", "refused the API key (HTTP 401)"), ("404", "answered 404 for model 'm'")):
        with ChatServer() as server:
            for ref in refs:
                server.inject(user_message(ref), status, forever=True)
            assert main([*base, "--base-url", server.base_url]) == 2
            errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # besides the bar
            assert len(errors) == 1 and words in errors[0] and "3 requests in a row" in errors[0], errors
            assert server.total <= 8  # 3 failures, and at most a few more already in flight
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main([*base, "--base-url", f"http://127.0.0.1:{port}/v1"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect to the server at" in err and not (tmp_path / "out.jsonl").exists()


def test_ctrl_c_stops_a_build_within_seconds_and_keeps_the_answers_received(tmp_path):
    """Requests hang on the server (60 s HTTP timeout): Ctrl-C ends the build in seconds, not at the timeout, with
    exit 130, and the answers that arrived before are in the cache."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from swift_callbacks.generation.cache import GenerationCache

    refs = [{"id": f"r{i}", "query": f"What is {i} plus 1?", "response": str(i + 1)} for i in range(6)]
    source = tmp_path / "refs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in refs), encoding="utf-8")
    with ChatServer(slow_seconds=60) as server:
        for ref in refs[2:]:
            server.inject(user_message(ref), "slow", forever=True)
        argv = [sys.executable, "-m", "swift_callbacks", "build", "cot", "--input", str(source), "--output",
                str(tmp_path / "out.jsonl"), "--base-url", server.base_url, "--model", "m", "--cache-dir",
                str(tmp_path / "cache"), "--timeout", "60", "--max-retries", "0"]  # fmt: skip
        # SIGINT as a shell gives it: an earlier test in this process may have left it ignored, and a child
        # inherits an ignored SIGINT (Python then installs no KeyboardInterrupt handler).
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
        deadline = time.monotonic() + 60
        while server.total < len(refs) and time.monotonic() < deadline:  # every request sent, 4 of them hanging
            time.sleep(0.05)
        time.sleep(0.3)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert time.monotonic() - start < 5 and proc.returncode == 130
    with GenerationCache(tmp_path / "cache") as cache:
        assert len(cache) == 2
