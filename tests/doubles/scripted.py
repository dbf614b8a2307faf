"""In-process backends for tests: answers computed by a function of the request, no model, no server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from swift_callbacks.generation import GenerationRequest, GenerationResult


class ScriptedBackend:
    """A backend answering from a function of the request: for tests of parsing and templates only.

    ``reply(request)`` returns one text or a list of ``n`` texts; an exception it raises becomes that request's
    ``error``. Every request seen is kept in ``calls``.
    """

    name = "scripted"
    supports_completion = True  # ``reply`` sees the request, raw prompt included

    def __init__(self, reply: Callable[[GenerationRequest], str | list[str]], model: str = "scripted") -> None:
        self.reply = reply
        self.model = model
        self.calls: list[GenerationRequest] = []

    def generate(self, requests: list[GenerationRequest]) -> Iterator[GenerationResult]:
        for req in requests:
            self.calls.append(req)
            try:
                out = self.reply(req)
            except Exception as err:  # scripted failure
                yield GenerationResult(req.key, error=f"{type(err).__name__}: {err}")
                continue
            texts = out if isinstance(out, list) else [out]
            yield GenerationResult(req.key, texts=texts, prompt_tokens=1, completion_tokens=len(texts))


def arithmetic_teacher(req: GenerationRequest) -> str | list[str]:
    """The arithmetic stand-in of ``scripts/arithmetic_standin.py`` answering one request."""
    import arithmetic_standin  # scripts/ is on sys.path through tests/conftest.py; it imports ScaleQuest

    return arithmetic_standin.answer(req.message_dicts(), req.params.n)


SCRIPTED_MODELS: dict[str, Callable[[GenerationRequest], str | list[str]]] = {"arithmetic": arithmetic_teacher}


def scripted_backend(model: str) -> ScriptedBackend:
    """The factory registered as ``scripted`` (``"scripted:arithmetic"`` in a model spec).

    Raises:
        ValueError: Unknown model name.
    """
    if model not in SCRIPTED_MODELS:
        raise ValueError(f"unknown scripted model {model!r}; available: {sorted(SCRIPTED_MODELS)}")
    import arithmetic_standin

    return ScriptedBackend(SCRIPTED_MODELS[model], model=f"{model}-v{arithmetic_standin.VERSION}")
