"""The public backend registry: code outside the package adds a backend by name, and model specs resolve it.

Also: the stand-in server of scripts/chat_server.py answers over HTTP exactly as the in-process arithmetic double.
"""

from __future__ import annotations

import pytest
from chat_server import ChatServer, arithmetic_responder
from doubles import ScriptedBackend

from swift_callbacks.builders.scalequest import DEFAULT_PROMPTS, ConfigError, ModelSpec, generation_backend
from swift_callbacks.builders.scalequest.backends import score_backend
from swift_callbacks.generation import (
    GenerationRequest,
    Generator,
    OpenAICompatibleBackend,
    SamplingParams,
    UnknownBackendError,
    get_backend,
    make_backend,
    register_backend,
    registered_backends,
    unregister_backend,
)
from swift_callbacks.generation import registry as registry_module


@pytest.fixture
def echo():
    """A backend ``echo`` registered for one test: answers ``<model>: <last message>``, with its factory options."""

    def make_echo(model: str, prefix: str = "") -> ScriptedBackend:
        return ScriptedBackend(lambda req: f"{prefix}{model}: {req.messages[-1][1]}", model=model)

    register_backend("echo", make_echo)
    yield make_echo
    unregister_backend("echo")


def test_a_registered_backend_is_found_by_name(echo):
    assert get_backend("echo") is echo and "echo" in registered_backends()
    backend = make_backend("echo", "m1", prefix="> ")
    with Generator(backend, None, progress=False) as gen:
        result = gen.run([GenerationRequest.chat("k", [{"role": "user", "content": "hi"}])])["k"]
    assert result.texts == ["> m1: hi"]
    unregister_backend("echo")
    with pytest.raises(UnknownBackendError, match="no backend registered as 'echo'"):
        get_backend("echo")


@pytest.mark.parametrize(
    "name, message",
    [("openai", "built in"), ("stage", "built in"), ("a:b", "must match"), ("", "must match"), ("9x", "must match")],
)
def test_register_refuses_built_in_and_malformed_names(name, message):
    with pytest.raises(ValueError, match=message):
        register_backend(name, lambda model: None)


def test_register_refuses_a_second_factory_unless_replacing(echo):
    register_backend("echo", echo)  # the same factory again: no-op
    with pytest.raises(ValueError, match="already registered"):
        register_backend("echo", lambda model: None)
    other = lambda model: None  # noqa: E731
    register_backend("echo", other, replace=True)
    assert get_backend("echo") is other


def test_an_entry_point_is_loaded_on_first_lookup(monkeypatch):
    class Point:
        name, group = "plugged", registry_module.ENTRY_POINT_GROUP

        def load(self):
            return lambda model: ScriptedBackend(lambda req: "plugged", model=model)

    monkeypatch.setattr(registry_module, "entry_points", lambda group: [Point()] if group == Point.group else [])
    try:
        assert "plugged" in registered_backends()
        assert ModelSpec.parse("plugged:x").backend == "plugged"
        assert make_backend("plugged", "x").model == "x"
    finally:
        unregister_backend("plugged")


def test_model_specs_resolve_registered_names(echo):
    spec = ModelSpec.parse("echo:m1", "models.teacher")
    assert (spec.backend, spec.model, spec.registered) == ("echo", "m1", True)
    assert generation_backend(spec).model == "m1" and score_backend(spec, text_format="text").model == "m1"
    mapped = ModelSpec.parse({"backend": "echo", "model": "m2", "options": {"prefix": "> "}, "tokenizer": "t"})
    assert mapped.options == {"prefix": "> "} and mapped.tokenizer == "t"
    assert mapped.identity() == 'echo:m2{"prefix": "> "}' and spec.identity() == "echo:m1"
    assert generation_backend(mapped).reply(GenerationRequest.chat("k", [{"role": "user", "content": "q"}])) == (
        "> m2: q"
    )
    with pytest.raises(ConfigError, match=r"models\.teacher\.engine: unknown key for backend 'echo'"):
        ModelSpec.parse({"backend": "echo", "model": "m", "engine": {}}, "models.teacher")
    with pytest.raises(ConfigError, match=r"models\.teacher\.options: expected dict"):
        ModelSpec.parse({"backend": "echo", "model": "m", "options": "x"}, "models.teacher")
    unregister_backend("echo")
    with pytest.raises(ConfigError, match="no backend registered as 'echo'"):
        generation_backend(spec)  # a spec read while the backend was there


def test_unregistered_names_keep_their_old_meaning():
    assert ModelSpec.parse("unknown-thing:x").backend == "transformers"  # a path or hub id, as before
    with pytest.raises(ConfigError, match="expected one of transformers, vllm, openai, tiny, stage"):
        ModelSpec.parse({"backend": "nope", "model": "m"}, "m")


def test_the_stand_in_server_answers_as_the_in_process_double(tmp_path):
    question = "Ann has 12 pens and buys 5 more. How many pens does she have?"
    judge = DEFAULT_PROMPTS.solvability_judge.replace("{question}", question)
    respond = DEFAULT_PROMPTS.respond.replace("{question}", question)
    requests = [
        GenerationRequest.chat("judge", [{"role": "user", "content": judge}]),
        GenerationRequest.chat("respond", [{"role": "user", "content": respond}], SamplingParams(n=4)),
    ]
    local = make_backend("scripted", "arithmetic")
    with Generator(local, None, progress=False) as gen:
        expected = {k: r.texts for k, r in gen.run(requests).items()}
    with ChatServer(responder=arithmetic_responder) as server:
        backend = OpenAICompatibleBackend(server.base_url, "arithmetic-v1", max_retries=0)
        with Generator(backend, tmp_path / "cache", progress=False) as gen:
            got = {k: r.texts for k, r in gen.run(requests).items()}
    assert got == expected and expected["judge"][0].endswith("Yes") and len(expected["respond"]) == 4
    assert any("\\boxed{17}" in text for text in expected["respond"])
