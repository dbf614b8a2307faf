"""OpenAICompatibleBackend + Generator against a real local HTTP server (scripts/chat_server.py).

Timeouts and backoffs are tiny so that every fault costs milliseconds, except the one deliberate client timeout.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from chat_server import ChatServer
from generation_build import build_requests

from swift_callbacks.generation import GenerationRequest, Generator, OpenAICompatibleBackend, SamplingParams
from swift_callbacks.generation.cache import CACHE_FILENAME
from swift_callbacks.generation.openai_backend import parse_retry_after

REPO = Path(__file__).resolve().parents[1]
FAST = {"timeout": 0.5, "backoff": 0.01, "backoff_max": 0.05}


@pytest.fixture
def server():
    with ChatServer(slow_seconds=3.0) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _no_ambient_keys(monkeypatch):
    for var in ("SWIFT_API_KEY", "OPENAI_API_KEY", "OPENAI_LOG"):
        monkeypatch.delenv(var, raising=False)


def backend_for(srv: ChatServer, **kwargs) -> OpenAICompatibleBackend:
    return OpenAICompatibleBackend(srv.base_url, "test-model", **{**FAST, "max_retries": 4, **kwargs})


def ask(content: str, key: str | None = None, **params) -> GenerationRequest:
    return GenerationRequest.chat(key or content, [{"role": "user", "content": content}], SamplingParams(**params))


def test_faults_are_retried_until_success_and_permanent_ones_fail(server, tmp_path):
    server.inject("a", "429", "500", "slow", "drop")  # every retryable kind, then success
    server.inject("b", "409", "408", "503")
    server.inject("dead", "500", forever=True)
    server.inject("bad", "400")
    server.inject("missing", "404")
    server.inject("unprocessable", "422")
    server.inject_nth(2, "drop")  # whichever request comes second loses its connection once
    contents = ["a", "b", "dead", "bad", "missing", "unprocessable"] + [f"ok-{i}" for i in range(6)]
    # Five retries: room for "a"'s four faults plus the drop below, should that hit "a" too.
    gen = Generator(backend_for(server, max_retries=5), tmp_path, progress=False)

    results = gen.run([ask(c) for c in contents])

    assert list(results) == contents  # every key back, in request order
    permanent = {"dead", "bad", "missing", "unprocessable"}
    for content, res in results.items():
        assert res.ok is (content not in permanent), (content, res.error)
        if res.ok:
            assert res.texts == [f"echo: {content}"]
    assert "HTTP 500" in results["dead"].error and "after 6 attempts" in results["dead"].error
    assert "HTTP 400" in results["bad"].error  # final at once (one more attempt if it caught the drop below)
    expected = {"a": 5, "b": 4, "dead": 6, "bad": 1, "missing": 1, "unprocessable": 1}
    expected.update({c: 1 for c in contents if c.startswith("ok-")})
    # The message that came second paid one more request for the injected drop (unless its retry budget is
    # spent anyway: "dead" makes 6 attempts whatever fails them).
    dropped = server.nth_hits[2]
    if dropped != "dead":
        expected[dropped] += 1
    assert {c: server.count(c) for c in contents} == expected
    assert server.total == sum(expected.values())
    assert f"after {expected['bad']} attempt" in results["bad"].error
    assert (gen.stats.requests, gen.stats.sent, gen.stats.failed, gen.stats.succeeded) == (12, 12, 4, 8)

    # Failures were not cached: a rerun asks only for them (and the 4xx ones fail again at once).
    before = server.total
    again = gen.run([ask(c) for c in contents])
    assert server.total - before == 6 + 1 + 1 + 1
    assert gen.last_stats.cached == 8 and all(again[c].cached for c in contents if c not in permanent)


def test_retry_after_is_honoured(tmp_path):
    with ChatServer(retry_after="0.3") as srv:
        srv.inject("x", "429")
        backend = OpenAICompatibleBackend(srv.base_url, "m", timeout=5, max_retries=1, backoff=30, backoff_max=30)
        start = time.perf_counter()
        res = Generator(backend, None, progress=False).run([ask("x")])["x"]
        elapsed = time.perf_counter() - start
    assert res.ok and srv.count("x") == 2
    assert 0.3 <= elapsed < 5  # waited what the server asked, not the 15-30 s backoff


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after": "Thu, 01 Jan 2026 00:00:10 GMT"}, 10.0),
        ({"retry-after": "Thu, 01 Jan 2026 00:00:00 GMT"}, 0.0),  # in the past: no wait
        ({"retry-after": "soon"}, None),
        ({}, None),
        (None, None),
    ],
)
def test_parse_retry_after(headers, expected):
    now = 1767225600.0  # 2026-01-01T00:00:00Z
    assert parse_retry_after(headers, now=now) == expected


def test_wire_format_sampling_n_and_usage(server):
    backend = backend_for(server, extra_body={"top_k": 5})
    req = ask("hello world", temperature=0.7, top_p=0.9, max_tokens=33, n=3, seed=11, stop=("END",))
    res = Generator(backend, None, progress=False).run([req])["hello world"]

    assert res.texts == [server.reply_for("hello world", i, 3) for i in range(3)]
    assert (res.prompt_tokens, res.completion_tokens) == (2, 3 * 4)
    body = server.bodies[-1]
    assert body["model"] == "test-model" and body["messages"] == [{"role": "user", "content": "hello world"}]
    wanted = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 33, "n": 3, "seed": 11, "stop": ["END"], "top_k": 5}
    assert {k: body.get(k) for k in wanted} == wanted


def test_an_unusable_200_reply_is_asked_again_and_an_error_when_it_stays(server):
    server.inject("few", "short")  # the first answer has 1 choice for n=2: asked again, the second is right
    res = Generator(backend_for(server), None, progress=False).run([ask("few", n=2)])["few"]
    assert res.ok and len(res.texts) == 2 and server.count("few") == 2
    server.inject("always", "short", forever=True)
    res = Generator(backend_for(server, max_retries=2), None, progress=False).run([ask("always", n=2)])["always"]
    assert not res.ok and "1 choice(s), 2 requested" in res.error and "after 3 attempts" in res.error
    assert server.count("always") == 3 and res.fatal is None  # a bad reply is this request's, not every one's


def test_concurrency_is_bounded_and_results_stream_as_they_finish():
    with ChatServer(delay=0.15) as srv:
        srv.inject("first-slow", "slow", "slow")  # times out twice (0.5 s each), then answers: finishes last
        srv.slow_seconds = 1.0
        backend = OpenAICompatibleBackend(srv.base_url, "m", max_concurrency=3, **FAST)
        order = [r.key for r in backend.generate([ask(c) for c in ["first-slow"] + [f"q{i}" for i in range(8)]])]
    assert 2 <= srv.max_in_flight <= 3
    assert sorted(order) == sorted(["first-slow"] + [f"q{i}" for i in range(8)]) and order[-1] == "first-slow"


def test_stopping_early_cancels_queued_requests():
    with ChatServer(delay=0.2) as srv:
        backend = OpenAICompatibleBackend(srv.base_url, "m", max_concurrency=2, **FAST)
        stream = backend.generate([ask(f"q{i}") for i in range(30)])
        next(stream)
        start = time.perf_counter()
        stream.close()  # what happens when a build is interrupted
        assert time.perf_counter() - start < 0.1  # does not wait for the queue
        time.sleep(0.5)
    assert srv.total <= 4  # the first two, and at most the two that had started when it was closed


def test_cache_key_changes_miss_and_rerun_costs_nothing(server, tmp_path):
    class OtherBackend(OpenAICompatibleBackend):
        name = "other-openai"

    base = ask("same", key="k", temperature=0.5, seed=1)
    variants = [
        (backend_for(server), base),
        (backend_for(server), GenerationRequest("k", (("user", "different"),), base.params)),
        (OpenAICompatibleBackend(server.base_url, "other-model", **FAST), base),
        (OtherBackend(server.base_url, "test-model", **FAST), base),
    ]
    for change in ("temperature", "top_p", "max_tokens", "n", "seed", "stop"):
        value = {"temperature": 0.6, "top_p": 0.8, "max_tokens": 7, "n": 2, "seed": 2, "stop": ("x",)}[change]
        params = SamplingParams(**{**base.params.__dict__, change: value})
        variants.append((backend_for(server), GenerationRequest(base.key, base.messages, params)))

    for round_ in range(2):
        before = server.total
        for backend, req in variants:
            with Generator(backend, tmp_path, progress=False) as gen:
                res = gen.run([req])["k"]
            assert res.ok and res.cached is (round_ == 1)
        # First round: every variant missed (one request each). Second round: all hits, zero requests.
        assert server.total - before == (len(variants) if round_ == 0 else 0)


def test_api_key_never_leaks(server, tmp_path, caplog, capsys):
    secret = f"sk-swift-test-{uuid.uuid4().hex}"
    for name in ("", "openai", "httpx2", "httpcore2", "swift_callbacks"):
        caplog.set_level(logging.DEBUG, logger=name or None)
    server.inject("echo-my-key", "401-echo")  # the server puts the Authorization header in its error text
    server.inject("always-down", "500", forever=True)
    backend = backend_for(server, api_key=secret, max_retries=1)
    gen = Generator(backend, tmp_path, progress=True)
    results = gen.run([ask("fine"), ask("echo-my-key"), ask("always-down")])

    assert server.auth_headers and all(h == f"Bearer {secret}" for h in server.auth_headers)  # it was sent
    assert results["fine"].ok and not results["echo-my-key"].ok and not results["always-down"].ok
    assert "<redacted>" in results["echo-my-key"].error
    out, err = capsys.readouterr()
    gen.close()
    seen = [
        out,
        err,
        caplog.text,
        repr(backend),
        repr(gen),
        str(vars(backend)),
        *(r.error or "" for r in results.values()),
    ]
    cache_bytes = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    with pytest.raises(ValueError) as bad_settings:
        OpenAICompatibleBackend(server.base_url, "m", api_key=secret, max_concurrency=0)
    seen.append(str(bad_settings.value))
    assert all(secret not in text for text in seen)
    assert secret.encode() not in cache_bytes and b"echo: fine" in cache_bytes


def test_api_key_from_environment(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai-env")
    Generator(backend_for(server), None, progress=False).run([ask("one")])
    monkeypatch.setenv("SWIFT_API_KEY", "from-swift-env")  # preferred over OPENAI_API_KEY
    Generator(backend_for(server), None, progress=False).run([ask("two")])
    monkeypatch.delenv("SWIFT_API_KEY")
    monkeypatch.delenv("OPENAI_API_KEY")
    Generator(backend_for(server), None, progress=False).run([ask("three")])
    assert server.auth_headers == ["Bearer from-openai-env", "Bearer from-swift-env", "Bearer EMPTY"]


def _cached_keys(cache_dir: Path) -> set[str]:
    path = cache_dir / CACHE_FILENAME
    if not path.exists():
        return set()
    with sqlite3.connect(path, timeout=5) as conn:
        try:
            return {row[0] for row in conn.execute("SELECT key FROM generations")}
        except sqlite3.OperationalError:  # table not created yet
            return set()


def _start_build(srv: ChatServer, cache_dir: Path, out: Path, count: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    script = str(REPO / "tests" / "generation_build.py")
    args = [sys.executable, script, srv.base_url, str(cache_dir), str(out), str(count)]
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_killed_build_resumes_without_resending_finished_items(tmp_path):
    count, finished = 10, 4
    requests = build_requests(count)
    cache_dir, out = tmp_path / "cache", tmp_path / "out.json"
    with ChatServer(delay=0.2, hold_after=finished) as srv:
        identity = OpenAICompatibleBackend(srv.base_url, "test-model").cache_identity  # model @ server URL
        key_of = {r.cache_key("openai", identity): r.messages[-1][1] for r in requests}
        proc = _start_build(srv, cache_dir, out, count)
        try:
            deadline = time.monotonic() + 30
            while len(_cached_keys(cache_dir)) < finished and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            while srv.total < finished + 2 and time.monotonic() < deadline:  # two more are held in flight
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        assert not out.exists() and srv.ok_count == finished
        done = {key_of[k] for k in _cached_keys(cache_dir)}
        assert len(done) == finished
        first_counts = {f"item-{i}": srv.count(f"item-{i}") for i in range(count)}

        srv.hold_after = None
        before = srv.total
        proc = _start_build(srv, cache_dir, out, count)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr.decode()

    assert srv.total - before == count - finished  # only the unfinished items were sent again
    for i in range(count):
        content = f"item-{i}"
        extra = 0 if content in done else 1
        assert srv.count(content) == first_counts[content] + extra, content
    results = json.loads(out.read_text())
    assert {k: v["texts"] for k, v in results.items()} == {f"k{i}": [f"echo: item-{i}"] for i in range(count)}
    assert sum(v["cached"] for v in results.values()) == finished


def test_cache_identity_includes_base_url_and_extra_body(tmp_path):
    req = [GenerationRequest.chat("q", [{"role": "user", "content": "hi"}], SamplingParams(temperature=0.7))]
    with ChatServer(replies={"hi": "A"}) as a, ChatServer(replies={"hi": "B"}) as b:
        thinking = {"chat_template_kwargs": {"enable_thinking": True}}
        first = Generator(OpenAICompatibleBackend(a.base_url, "m", extra_body=thinking), tmp_path, progress=False)
        assert first.run(req)["q"].texts == ["A"]
        same = Generator(OpenAICompatibleBackend(a.base_url + "/", "m", extra_body=thinking), tmp_path, progress=False)
        assert same.run(req)["q"].cached and a.total == 1  # one server, one setting: one key
        off = {"chat_template_kwargs": {"enable_thinking": False}}
        other = Generator(OpenAICompatibleBackend(a.base_url, "m", extra_body=off), tmp_path, progress=False)
        assert not other.run(req)["q"].cached and a.total == 2
        server_b = Generator(OpenAICompatibleBackend(b.base_url, "m", extra_body=thinking), tmp_path, progress=False)
        result = server_b.run(req)["q"]
        assert not result.cached and result.texts == ["B"] and b.total == 1


def test_cache_key_normalizes_sampling_numbers():
    def key(**params):
        return GenerationRequest.chat("q", [{"role": "user", "content": "hi"}], SamplingParams(**params)).cache_key(
            "openai", "m"
        )

    assert key(temperature=1) == key(temperature=1.0)
    assert key(top_p=1) == key(top_p=1.0)
    assert key(temperature=1) != key(temperature=0.5)


def test_finish_reason_comes_back_from_the_server():
    with ChatServer(replies={"hi": "ok"}) as srv:
        result = Generator(OpenAICompatibleBackend(srv.base_url, "m"), None, progress=False).run(
            [GenerationRequest.chat("q", [{"role": "user", "content": "hi"}])]
        )["q"]
    assert result.finish_reasons == ["stop"] and not result.truncated(0)


class _FakeCompletions:
    """Stands in for ``openai.OpenAI().completions``: records the call, answers with ``texts``."""

    def __init__(self, texts):
        self.texts, self.calls = texts, []

    def create(self, **kwargs):
        from types import SimpleNamespace

        self.calls.append(kwargs)
        choices = [SimpleNamespace(index=i, text=t) for i, t in enumerate(self.texts)]
        return SimpleNamespace(choices=choices, usage=SimpleNamespace(prompt_tokens=3, completion_tokens=5))


def test_completion_requests_use_the_completions_endpoint():
    backend = OpenAICompatibleBackend("http://127.0.0.1:9/v1", "qgen", max_retries=0, timeout=1.0)
    fake = _FakeCompletions(["Q one?", "Q two?"])
    backend._client.completions = fake
    params = SamplingParams(temperature=1.0, top_p=0.99, max_tokens=512, n=2, seed=11)
    (result,) = list(backend.generate([GenerationRequest.completion("k", "<|im_start|>user\n", params)]))
    assert result.ok and result.texts == ["Q one?", "Q two?"] and result.completion_tokens == 5
    assert fake.calls == [{"model": "qgen", "prompt": "<|im_start|>user\n", "temperature": 1.0, "top_p": 0.99,
                           "max_tokens": 512, "n": 2, "seed": 11}]  # fmt: skip
    backend._client.completions = _FakeCompletions(["only one"])
    (short,) = list(backend.generate([GenerationRequest.completion("k", "p", params)]))
    assert not short.ok and "server returned 1 choice(s), 2 requested" in short.error
