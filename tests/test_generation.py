"""Generator, cache, import hygiene, command-line factory and the vLLM adapter (no server, no model)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import ClassVar

import pytest
from doubles import ScriptedBackend

from swift_callbacks.generation import (
    BackendConfigError,
    GenerationCache,
    GenerationRequest,
    GenerationResult,
    Generator,
    OpenAICompatibleBackend,
    SamplingParams,
    add_backend_arguments,
    backend_from_args,
    sampling_from_args,
)
from swift_callbacks.generation.cache import CACHE_FILENAME, CacheError

REPO = Path(__file__).resolve().parents[1]


def ask(content: str, key: str | None = None, **params) -> GenerationRequest:
    return GenerationRequest.chat(key or content, [{"role": "user", "content": content}], SamplingParams(**params))


def echo(req: GenerationRequest) -> str:
    return f"echo: {req.messages[-1][1]}"


# -- import hygiene ---------------------------------------------------------------------------------------------


def test_importing_generation_never_imports_torch():
    code = (
        "import sys\n"
        "import swift_callbacks.generation as g\n"
        "from swift_callbacks.generation import cache, factory, openai_backend, runner\n"
        "from swift_callbacks.generation import transformers_backend, vllm_backend\n"
        "g.OpenAICompatibleBackend, g.TransformersBackend, g.VLLMBackend, g.backend_from_args\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'vllm'))\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# -- Generator ---------------------------------------------------------------------------------------------------


def test_run_answers_every_key_in_order_and_caches_successes(tmp_path):
    fail_once = {"b"}

    def reply(req):
        content = req.messages[-1][1]
        if content in fail_once:
            fail_once.discard(content)
            raise RuntimeError("flaky")
        return echo(req)

    backend = ScriptedBackend(reply)
    gen = Generator(backend, tmp_path, progress=False)
    reqs = [ask(c) for c in "cab"]
    first = gen.run(reqs)
    assert list(first) == ["c", "a", "b"]
    assert first["a"].texts == ["echo: a"] and not first["a"].cached
    assert first["b"].error == "RuntimeError: flaky"
    assert (gen.last_stats.sent, gen.last_stats.succeeded, gen.last_stats.failed) == (3, 2, 1)

    second = gen.run(reqs)  # only the failure is asked again
    assert [r.messages[-1][1] for r in backend.calls] == ["c", "a", "b", "b"]
    assert all(r.ok for r in second.values()) and second["a"].cached and not second["b"].cached
    assert (gen.last_stats.cached, gen.last_stats.sent) == (2, 1)
    assert gen.stats.requests == 6 and gen.stats.failed == 1  # summed over both runs
    assert "6 requests" in gen.stats.summary() and "1 failed" in gen.stats.summary()


def test_duplicate_keys_are_rejected_with_their_names(tmp_path):
    gen = Generator(ScriptedBackend(echo), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"'x'.*'y'|'y'.*'x'"):
        gen.run([ask("1", key="x"), ask("2", key="x"), ask("3", key="y"), ask("4", key="y"), ask("5", key="z")])


def test_identical_requests_are_sent_once(tmp_path):
    backend = ScriptedBackend(echo)
    results = Generator(backend, None, progress=False).run([ask("same", key="k1"), ask("same", key="k2")])
    assert len(backend.calls) == 1
    assert results["k1"].texts == results["k2"].texts == ["echo: same"] and results["k2"].key == "k2"


def test_each_success_is_committed_while_the_backend_is_still_answering(tmp_path):
    """The writer thread commits an answer within moments, without waiting for the build to end: while the backend
    holds back the next answer, a separate connection sees every earlier one."""
    seen_on_disk = []

    def count() -> int:
        with sqlite3.connect(tmp_path / CACHE_FILENAME) as conn:
            return conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0]

    class Watching(ScriptedBackend):
        def generate(self, requests):
            for i, res in enumerate(super().generate(requests)):
                deadline = time.monotonic() + 10
                while i and count() < i and time.monotonic() < deadline:
                    time.sleep(0.005)
                if i:
                    seen_on_disk.append(count())
                yield res

    Generator(Watching(echo), tmp_path, progress=False).run([ask(c) for c in "abcd"])
    assert seen_on_disk == [1, 2, 3] and count() == 4


def test_backend_contract_breaches_become_errors(tmp_path):
    class Broken(ScriptedBackend):
        def generate(self, requests):
            yield GenerationResult(requests[0].key, texts=["fine"])
            yield GenerationResult("stranger", texts=["?"])  # not asked for: ignored
            raise RuntimeError("engine died")

    class Silent(ScriptedBackend):
        def generate(self, requests):
            return iter(())

    broken = Generator(Broken(echo), tmp_path, progress=False).run([ask("a"), ask("b")])
    assert broken["a"].ok and "engine died" in broken["b"].error
    assert set(broken) == {"a", "b"}
    assert Generator(Broken(echo), tmp_path, progress=False).run([ask("a")])["a"].cached  # "a" was kept
    silent = Generator(Silent(echo), None, progress=False).run([ask("x")])
    assert silent["x"].error == "backend returned no result for this request"


def test_progress_bar_shows_totals_failures_and_tokens(tmp_path, capsys):
    def reply(req):
        if req.key == "bad":
            raise ValueError("no")
        return "ok"

    Generator(ScriptedBackend(reply), tmp_path, desc="cot", progress=True).run([ask("1"), ask("2", key="bad")])
    err = capsys.readouterr().err
    assert "cot" in err and "2/2" in err and "failed=1" in err and "tokens=2" in err


# -- cache -------------------------------------------------------------------------------------------------------


def test_cache_is_wal_threadsafe_and_stores_json(tmp_path):
    cache = GenerationCache(tmp_path)

    def writer(t):
        for i in range(40):
            cache.put(f"{t}-{i}", GenerationResult("k", texts=[f"t{t}", "é"], prompt_tokens=i, completion_tokens=2))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(cache) == 240
    hit = cache.get("3-7")
    assert (hit.texts, hit.prompt_tokens, hit.completion_tokens, hit.cached) == (["t3", "é"], 7, 2, True)
    assert cache.get("missing") is None
    assert len(cache.get_many([f"5-{i}" for i in range(40)] + ["nope"] * 600)) == 40
    with pytest.raises(ValueError):
        cache.put("x", GenerationResult("k", error="boom"))
    cache.close()

    with sqlite3.connect(tmp_path / CACHE_FILENAME) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        value = json.loads(conn.execute("SELECT value FROM generations WHERE key='0-1'").fetchone()[0])
    assert set(value) == {"texts", "prompt_tokens", "completion_tokens", "finish_reasons", "created"}


def test_cache_commits_in_the_background_and_a_failed_write_is_not_lost(tmp_path):
    """Answers are committed by the writer thread shortly after put() without any flush (another connection sees
    them); a write that fails (here: the table dropped behind the cache's back) is raised by the next put/flush,
    never swallowed."""
    cache = GenerationCache(tmp_path)
    for i in range(50):
        cache.put(f"k{i}", GenerationResult("k", texts=[str(i)]))
    deadline = time.monotonic() + 10
    with sqlite3.connect(tmp_path / CACHE_FILENAME) as conn:
        while conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0] < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0] == 50
        conn.execute("DROP TABLE generations")
    cache.put("lost", GenerationResult("k", texts=["x"]))
    with pytest.raises(CacheError, match="no such table") as caught:
        cache.flush()
    assert str(tmp_path) in str(caught.value) and isinstance(caught.value.__cause__, sqlite3.OperationalError)
    with pytest.raises(CacheError):
        cache.put("later", GenerationResult("k", texts=["y"]))
    with pytest.raises(CacheError):
        cache.close()
    with pytest.raises(CacheError):
        cache.close()


@pytest.mark.parametrize("damage", ["garbage", "directory"])
def test_a_damaged_cache_is_one_clear_error(tmp_path, damage):
    path = tmp_path / CACHE_FILENAME
    if damage == "garbage":
        path.write_bytes(os.urandom(4096))
    else:
        path.mkdir()
    with pytest.raises(CacheError, match=f"generation cache {re.escape(str(path))}: .*--cache-dir"):
        GenerationCache(tmp_path)


def test_a_cache_never_closed_is_committed_at_exit(tmp_path):
    script = (
        "import sys\n"
        "from swift_callbacks.generation.cache import GenerationCache\n"
        "from swift_callbacks.generation.base import GenerationResult\n"
        "cache = GenerationCache(sys.argv[1])\n"
        "for i in range(2000):\n"
        "    cache.put(f'k{i}', GenerationResult('k', texts=[str(i)]))\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=120)
    with sqlite3.connect(tmp_path / CACHE_FILENAME) as conn:
        assert conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0] == 2000


def test_a_cache_inherited_through_fork_refuses_to_write(tmp_path):
    """A forked child has no writer thread: writing to the parent's cache there is an error (not a flush that
    waits forever, nor answers silently lost)."""
    import os

    cache = GenerationCache(tmp_path)
    cache.put("parent", GenerationResult("k", texts=["p"]))
    cache.flush()
    pid = os.fork()
    if pid == 0:  # child
        try:
            cache.put("child", GenerationResult("k", texts=["c"]))
            os._exit(1)
        except RuntimeError as err:
            cache.close()
            os._exit(0 if "opened in another process" in str(err) else 2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cache.get("parent").texts == ["p"] and cache.get("child") is None
    cache.close()


def test_finish_reasons_are_recorded_and_cached(tmp_path):
    cache = GenerationCache(tmp_path)
    cache.put("a", GenerationResult("k", texts=["x", "y"], finish_reasons=["stop", "length"]))
    hit = cache.get("a")
    assert hit.finish_reasons == ["stop", "length"] and not hit.truncated(0) and hit.truncated(1)
    cache.close()
    assert not GenerationResult("k", texts=["x"]).truncated(0)  # a backend that does not say: not truncated


def test_cache_keys_depend_on_everything_that_shapes_the_answer():
    base = ask("hi", temperature=0.3, seed=1)
    key = base.cache_key("openai", "m")
    assert key == ask("hi", key="other-key", temperature=0.3, seed=1).cache_key("openai", "m")  # caller key: no
    others = {
        base.cache_key("vllm", "m"),
        base.cache_key("openai", "m2"),
        ask("hi!", temperature=0.3, seed=1).cache_key("openai", "m"),
        GenerationRequest(base.key, (("system", "be brief"), *base.messages), base.params).cache_key("openai", "m"),
    }
    for change in ({"temperature": 0.4}, {"top_p": 0.5}, {"max_tokens": 9}, {"n": 2}, {"seed": 2}, {"stop": ("x",)}):
        params = SamplingParams(**{**base.params.__dict__, **change})
        others.add(GenerationRequest(base.key, base.messages, params).cache_key("openai", "m"))
    assert key not in others and len(others) == 10


# -- factory -----------------------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    return add_backend_arguments(argparse.ArgumentParser()).parse_args(list(argv))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("SWIFT_BASE_URL", "SWIFT_MODEL", "SWIFT_API_KEY", "OPENAI_API_KEY", "MY_KEY"):
        monkeypatch.delenv(var, raising=False)


def test_factory_builds_an_http_backend_from_flags_or_env(monkeypatch):
    args = parse("--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-concurrency", "3", "--timeout", "7")
    backend = backend_from_args(args)
    assert isinstance(backend, OpenAICompatibleBackend)
    assert (backend.base_url, backend.model, backend.max_concurrency, backend.timeout) == (
        "http://127.0.0.1:9/v1",
        "m",
        3,
        7.0,
    )
    monkeypatch.setenv("SWIFT_BASE_URL", "http://127.0.0.1:8/v1")
    monkeypatch.setenv("SWIFT_MODEL", "env-model")
    from_env = backend_from_args(parse())
    assert (from_env.base_url, from_env.model) == ("http://127.0.0.1:8/v1", "env-model")
    assert parse().cache_dir == ".swift_cache/generation" and parse("--no-cache").cache_dir is None


def test_factory_errors_are_clear(monkeypatch):
    with pytest.raises(BackendConfigError, match=r"--base-url .*--model .*--local-model"):
        backend_from_args(parse())
    with pytest.raises(BackendConfigError, match=r"--model \(or SWIFT_MODEL\)"):
        backend_from_args(parse("--base-url", "http://127.0.0.1:9/v1"))
    with pytest.raises(BackendConfigError, match="choose one backend"):
        backend_from_args(parse("--local-model", "a", "--vllm-model", "b"))
    with pytest.raises(BackendConfigError, match="MY_KEY is not set"):
        backend_from_args(parse("--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--api-key-env", "MY_KEY"))


def test_the_key_is_refused_on_the_command_line_without_echoing_it(capsys):
    for argv in (["--api-key", "sk-123-secret"], ["--api-key=sk-123-secret"], ["--api-key-env", "sk-123-secret"]):
        with pytest.raises(SystemExit):
            parse(*argv)
        err = capsys.readouterr().err
        assert "sk-123-secret" not in err and ("--api-key-env NAME" in err or "NAME of an environment" in err)


def test_bad_numbers_are_rejected():
    with pytest.raises(SystemExit):
        parse("--top-p", "1.5")


def test_api_key_env_is_used(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-from-my-key")
    backend = backend_from_args(parse("--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--api-key-env", "MY_KEY"))
    assert backend._client.api_key == "sk-from-my-key"
    assert "sk-from-my-key" not in repr(backend)


def test_sampling_from_args_overrides_only_what_was_given():
    assert sampling_from_args(parse()) == SamplingParams()
    defaults = SamplingParams(temperature=0.7, max_tokens=64, n=4)
    got = sampling_from_args(parse("--temperature", "0", "--seed", "5", "--top-p", "0.9"), defaults)
    assert got == SamplingParams(temperature=0.0, top_p=0.9, max_tokens=64, n=4, seed=5)


# -- vLLM --------------------------------------------------------------------------------------------------------


def test_vllm_missing_names_the_extra(monkeypatch):
    from swift_callbacks.generation import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even where it is installed
    with pytest.raises(ImportError, match=r"pip install 'swift-callbacks\[vllm\]'"):
        VLLMBackend("some/model")


def _fake_vllm(fail_on: str | None = None) -> types.ModuleType:
    """Just enough of vLLM's offline API (LLM.chat, SamplingParams, RequestOutput) to test the adapter."""
    module = types.ModuleType("vllm")

    class FakeSamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class FakeLLM:
        instances: ClassVar[list] = []

        def __init__(self, model, **kwargs):
            self.model, self.kwargs, self.calls = model, kwargs, []
            FakeLLM.instances.append(self)

        def chat(self, conversations, sampling_params, use_tqdm):
            self.calls.append((conversations, sampling_params))
            if any(conv[-1]["content"] == fail_on for conv in conversations):
                raise RuntimeError("CUDA out of memory")
            return [self._answer(conv, sp) for conv, sp in zip(conversations, sampling_params, strict=True)]

        def generate(self, prompts, sampling_params, use_tqdm):  # raw-text completion
            self.calls.append((prompts, sampling_params))
            return [self._answer([{"content": p}], sp) for p, sp in zip(prompts, sampling_params, strict=True)]

        @staticmethod
        def _answer(conv, sp):
            text = conv[-1]["content"]
            outs = [types.SimpleNamespace(index=i, text=f"{text}/{i}", token_ids=[1] * (i + 2)) for i in range(sp.n)]
            return types.SimpleNamespace(prompt_token_ids=[0] * len(text), outputs=outs[::-1])

    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    return module


def test_vllm_adapter_maps_requests_and_chunks(monkeypatch, tmp_path):
    fake = _fake_vllm(fail_on="boom")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    from swift_callbacks.generation import VLLMBackend

    backend = VLLMBackend("org/model", chunk_size=2, tensor_parallel_size=2)
    llm = fake.LLM.instances[-1]
    assert (backend.name, backend.model, llm.model, llm.kwargs) == (
        "vllm",
        "org/model",
        "org/model",
        {"tensor_parallel_size": 2},
    )
    reqs = [ask("abc", n=2, temperature=0.5, seed=3, stop=("x",)), ask("z", n=2), ask("boom"), ask("q")]
    results = Generator(backend, tmp_path, progress=False).run(reqs)

    assert results["abc"].texts == ["abc/0", "abc/1"]  # sorted by sample index
    assert (results["abc"].prompt_tokens, results["abc"].completion_tokens) == (3, 2 + 3)
    assert results["z"].texts == ["z/0", "z/0"]  # greedy n=2: asked once, copied
    # The second chunk failed as a whole: each of its requests reports it, and nothing else is lost.
    assert "CUDA out of memory" in results["boom"].error and "CUDA out of memory" in results["q"].error
    assert [len(convs) for convs, _ in llm.calls] == [2, 2]
    sp = llm.calls[0][1][0]
    assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens, sp.seed, sp.stop) == (2, 0.5, 1.0, 512, 3, ["x"])


def test_vllm_answers_completion_requests_with_generate(monkeypatch, tmp_path):
    fake = _fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    from swift_callbacks.generation import VLLMBackend

    backend = VLLMBackend("org/model")
    assert backend.supports_completion
    raw = GenerationRequest.completion("raw", "<|im_start|>user\n", SamplingParams(n=1))
    results = Generator(backend, tmp_path, progress=False).run([raw, ask("chat")])
    assert results["raw"].texts == ["<|im_start|>user\n/0"] and results["chat"].texts == ["chat/0"]
    llm = fake.LLM.instances[-1]
    assert [call[0] for call in llm.calls] == [[[{"role": "user", "content": "chat"}]], ["<|im_start|>user\n"]]


def test_completion_requests_keep_the_cache_keys_of_earlier_prefix_requests():
    params = SamplingParams(temperature=1.0, n=4, seed=1)
    request = GenerationRequest.completion("k", "<|im_start|>user\n", params)
    legacy = GenerationRequest("k", (("prefix", "<|im_start|>user\n"),), params)  # how ScaleQuest wrote them before
    assert request.is_completion and request.messages == () and request.prompt == "<|im_start|>user\n"
    assert request.cache_key("vllm", "m") == legacy.cache_key("vllm", "m")
    assert request.cache_key("vllm", "m") != GenerationRequest.chat("k", [{"role": "user", "content": "x"}]).cache_key(
        "vllm", "m"
    )
