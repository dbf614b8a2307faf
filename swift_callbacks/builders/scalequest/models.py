"""Which model plays each role of a stage: model specs and the loaders of local models.

A model spec is a string or a mapping:

- ``"tiny:hidden_size=64,num_layers=2,seed=0"``: the offline tiny model (the grammar of
  :func:`swift_callbacks.models.parse_tiny`); for a scoring role, the same body with a one-output regression head.
- ``"stage:qft"``: the model a training stage of this pipeline wrote (resolved by the runner).
- ``"NAME:MODEL"``, where ``NAME`` is a backend registered with
  :func:`swift_callbacks.generation.register_backend` (a user's plugin, a test double): that backend's factory
  called with ``MODEL``.
- ``"vllm:PATH"``: vLLM's offline engine.
- any other string: a local folder or hub id run with transformers.
- a mapping with ``backend:`` one of ``transformers``, ``vllm``, ``openai``, ``tiny``, ``stage`` or a registered
  name, and that backend's options (``openai`` needs ``base_url`` and ``model``; the key comes from the environment
  variable ``api_key_env`` names, never from the file; a registered backend takes ``model``, ``tokenizer`` and
  ``options``, the keyword arguments of its factory).

Local weights (tiny, a folder, a Hub id, a ``.gguf`` file) are loaded by :mod:`swift_callbacks.models` through
:meth:`ModelSpec.weights`; the backends that run a spec are in :mod:`.backends`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...configuration import ConfigError
from ...generation.registry import is_registered, registered_backends
from ...models import ModelConfig, load_model_and_tokenizer, parse_tiny, tiny_identity
from ...models import load_tokenizer as load_weights_tokenizer
from .contract import path_digest

BACKENDS = ("transformers", "vllm", "openai", "tiny", "stage")  # built in; others come from the backend registry
# Options each backend accepts in the mapping form (besides "backend"); REGISTERED: any registered backend.
_OPTIONS = {
    "transformers": {"model", "tokenizer", "batch_size", "device", "dtype", "trust_remote_code"},
    "vllm": {"model", "tokenizer", "engine", "chunk_size"},
    "openai": {"model", "base_url", "api_key_env", "tokenizer", "max_concurrency", "timeout", "max_retries",
               "extra_body"},
    "tiny": {"tiny", "batch_size", "device"},
    "stage": {"model", "run_with", "batch_size", "device", "dtype", "engine", "chunk_size", "trust_remote_code"},
}  # fmt: skip
REGISTERED_OPTIONS = {"model", "tokenizer", "options"}


@dataclass(frozen=True)
class ModelSpec:
    """One model and how to run it (see the module docstring for the forms).

    Attributes:
        backend: One of ``BACKENDS``, or the name of a registered backend.
        model: Folder or hub id (transformers, vLLM), server model name (openai), stage name (stage), the model
            argument of a registered backend's factory.
        tokenizer: Tokenizer folder or hub id when it differs from ``model`` (for openai: where to read the chat
            template that makes question-generation prefixes).
        tiny: Keyword arguments of the tiny model.
        base_url: Server URL (openai).
        api_key_env: Name of the environment variable holding the API key (openai).
        batch_size: Prompts per batch (transformers, tiny) or per scoring batch.
        device: Device for transformers (default: CUDA when available).
        dtype: Weights dtype for transformers, e.g. ``"bfloat16"``.
        engine: Keyword arguments of ``vllm.LLM``.
        chunk_size: Requests per vLLM call.
        max_concurrency: Parallel HTTP requests (openai).
        timeout: Seconds per HTTP attempt (openai).
        max_retries: Retries per request (openai).
        extra_body: Extra JSON fields of every request (openai).
        trust_remote_code: Let transformers run the checkpoint's own modelling code (transformers backend; for vLLM
            put it in ``engine``).
        run_with: For ``stage`` models: generate with ``"transformers"`` (default) or ``"vllm"``.
        fingerprint: Set by the runner for ``stage:`` models: the producing stage's fingerprint.
        options: Keyword arguments of a registered backend's factory.
    """

    backend: str
    model: str = ""
    tokenizer: str | None = None
    tiny: dict[str, Any] = field(default_factory=dict)
    base_url: str | None = None
    api_key_env: str | None = None
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    chunk_size: int = 256
    max_concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 5
    extra_body: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    run_with: str = "transformers"
    fingerprint: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def registered(self) -> bool:
        """Whether the backend comes from the registry (:func:`swift_callbacks.generation.register_backend`)."""
        return self.backend not in BACKENDS

    @classmethod
    def parse(cls, value: Any, path: str = "model") -> ModelSpec:
        """Reads a spec from its string or mapping form.

        Raises:
            ConfigError: Unknown backend or option, a wrong type, or a missing required option.
        """
        if isinstance(value, ModelSpec):
            return value
        if isinstance(value, str):
            return _parse_string(value.strip(), path)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a model spec (string or mapping), got {type(value).__name__}")
        return _parse_mapping(value, path)

    def weights(self) -> ModelConfig:
        """The local weights this spec runs, as the one model loader takes them.

        Raises:
            ConfigError: The spec has no local weights (an OpenAI-compatible server, a registered backend), or an
                unknown dtype.
        """
        if self.backend == "tiny":
            return ModelConfig(tiny_identity(self.tiny))
        if self.backend not in ("transformers", "vllm"):
            raise ConfigError(f"model {self.identity()!r} has no local weights (a {self.backend!r} model)")
        dtype = self.dtype or "auto"
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"model {self.model!r}: dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        return ModelConfig(self.model, dtype=dtype, trust_remote_code=self.trust_remote_code, tokenizer=self.tokenizer)

    def identity(self) -> str:
        """What distinguishes this model's answers: part of the cache keys and the stage fingerprints."""
        if self.backend == "tiny":
            return tiny_identity(self.tiny)
        if self.backend == "openai" or self.registered:
            options = json.dumps(self.options, sort_keys=True, default=str) if self.options else ""
            return f"{self.backend}:{self.model}" + (f"@{self.base_url}" if self.base_url else "") + options
        if self.fingerprint:
            return f"{self.model}@{self.fingerprint[:16]}"
        if os.path.isdir(self.model):
            # A local folder may be overwritten by a new training run; its listing tells the versions apart.
            return f"{self.model}@{path_digest(self.model)[:16]}"
        return self.model


def resolve_stage_model(spec: ModelSpec, folder: str | os.PathLike, stage_fingerprint: str) -> ModelSpec:
    """The concrete spec of a ``stage:`` model: the stage's output folder, known by the stage's fingerprint."""
    if spec.backend != "stage":
        return spec
    return dataclasses.replace(spec, backend=spec.run_with, model=str(folder), fingerprint=stage_fingerprint)


def _parse_string(text: str, path: str) -> ModelSpec:
    kind, sep, rest = text.partition(":")
    if sep and kind == "tiny":
        return ModelSpec("tiny", tiny=parse_tiny(text, path))
    if text == "tiny":
        return ModelSpec("tiny")
    if sep and (kind in ("stage", "vllm") or (kind not in BACKENDS and is_registered(kind))):
        if not rest:
            raise ConfigError(f"{path}: {kind!r} spec needs a name after the colon")
        return ModelSpec(kind, model=rest)
    if sep and kind == "openai":
        raise ConfigError(f"{path}: give an OpenAI-compatible server as a mapping: {{backend: openai, base_url: ..., "
                          "model: ...}")  # fmt: skip
    if not text:
        raise ConfigError(f"{path}: empty model spec")
    return ModelSpec("transformers", model=text)


def _parse_mapping(value: Mapping[str, Any], path: str) -> ModelSpec:
    backend = value.get("backend")
    if backend not in BACKENDS and not (isinstance(backend, str) and is_registered(backend)):
        known = ", ".join([*BACKENDS, *registered_backends()])
        raise ConfigError(f"{path}.backend: expected one of {known} (or a name given to register_backend), "
                          f"got {backend!r}")  # fmt: skip
    allowed = _OPTIONS.get(backend, REGISTERED_OPTIONS)
    for key in value:
        if key != "backend" and key not in allowed:
            raise ConfigError(f"{path}.{key}: unknown key for backend {backend!r}; expected one of {sorted(allowed)}")
    kwargs = {k: v for k, v in value.items() if k != "backend"}
    if backend == "tiny":
        tiny_value = kwargs.get("tiny") or {}
        if isinstance(tiny_value, str):
            tiny_value = tiny_value if tiny_value.startswith("tiny") else f"tiny:{tiny_value}"
        kwargs["tiny"] = parse_tiny(tiny_value, f"{path}.tiny")
    elif not isinstance(kwargs.get("model"), str) or not kwargs["model"]:
        raise ConfigError(f"{path}.model: required for backend {backend!r}")
    if backend == "openai" and not kwargs.get("base_url"):
        raise ConfigError(f"{path}.base_url: required for backend 'openai'")
    if kwargs.get("run_with", "transformers") not in ("transformers", "vllm"):
        raise ConfigError(f"{path}.run_with: expected 'transformers' or 'vllm', got {kwargs['run_with']!r}")
    _check_types(kwargs, path)
    return ModelSpec(backend, **kwargs)


def _check_types(kwargs: dict[str, Any], path: str) -> None:
    types = {f.name: f.type for f in dataclasses.fields(ModelSpec)}
    expected = {"int": int, "float": (int, float), "str | None": (str, type(None)), "str": str, "dict[str, Any]": dict,
                "bool": bool}  # fmt: skip
    for key, value in kwargs.items():
        want = expected.get(str(types[key]))
        if want is not None and (not isinstance(value, want) or (isinstance(value, bool) and want is not bool)):
            raise ConfigError(f"{path}.{key}: expected {types[key]}, got {type(value).__name__}")


# ------------------------------------------------------------------------------------------------ building models


def device_of(spec: ModelSpec) -> str:
    import torch

    return spec.device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer of ``spec`` (for a server or registered backend: its ``tokenizer``, to build chat prefixes).

    Raises:
        ConfigError: An OpenAI-compatible or registered model without a ``tokenizer``.
    """
    if spec.backend in ("transformers", "vllm", "tiny"):
        return load_weights_tokenizer(spec.weights())
    if not spec.tokenizer:
        raise ConfigError(f"model {spec.identity()!r} needs a 'tokenizer' (folder or hub id) to build chat prefixes")
    return load_weights_tokenizer(ModelConfig(spec.tokenizer, trust_remote_code=spec.trust_remote_code))


def load_causal_lm(spec: ModelSpec) -> tuple[Any, Any]:
    """Tokenizer and causal LM of ``spec`` (to train or to generate with).

    Raises:
        ConfigError: The spec has no local weights.
    """
    return load_model_and_tokenizer(spec.weights())


def load_regression_model(spec: ModelSpec) -> tuple[Any, Any]:
    """Tokenizer and a one-output sequence regression model (a reward model, or the base of the difficulty scorer):
    the spec's body with a fresh ``score`` head where the checkpoint has none.

    Raises:
        ConfigError: The spec has no local weights.
    """
    return load_model_and_tokenizer(spec.weights(), head="regression")
