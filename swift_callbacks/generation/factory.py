"""Command-line options for choosing a generation backend, shared by every builder command.

Exactly one backend is chosen: ``--vllm-model`` (vLLM offline), ``--local-model`` (transformers), or an
OpenAI-compatible server from ``--base-url``/``--model`` (falling back to ``SWIFT_BASE_URL``/``SWIFT_MODEL``).
The API key is never taken on the command line, where it would land in shell history and ``ps``: only the
*name* of an environment variable holding it (``--api-key-env``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

from ..errors import UserError
from .base import Backend, SamplingParams

DEFAULT_CACHE_DIR = ".swift_cache/generation"
BASE_URL_ENV = "SWIFT_BASE_URL"
MODEL_ENV = "SWIFT_MODEL"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class BackendConfigError(UserError):
    """The command line does not pick exactly one usable backend."""


def add_backend_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the backend, sampling and cache options to ``parser`` (in their own argument groups).

    Args:
        parser: The parser of a command that generates text.

    Returns:
        The same parser, for chaining.
    """
    _add_server_arguments(parser.add_argument_group("generation backend"))
    _add_sampling_arguments(parser.add_argument_group("sampling"))
    cache = parser.add_argument_group("generation cache")
    cache.add_argument(
        "--cache-dir",
        default=DEFAULT_CACHE_DIR,
        help="directory of the answer cache; reruns only send what is not there (default: %(default)s)",
    )
    cache.add_argument(
        "--no-cache", dest="cache_dir", action="store_const", const=None, help="do not read or write the cache"
    )
    return parser


def _add_server_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--base-url", default=None, help=f"OpenAI-compatible server URL (env {BASE_URL_ENV})")
    group.add_argument("--model", default=None, help=f"model name on that server (env {MODEL_ENV})")
    group.add_argument(
        "--api-key-env",
        metavar="NAME",
        type=_env_var_name,
        default=None,
        help="name of the environment variable holding the API key (default: SWIFT_API_KEY, then OPENAI_API_KEY)",
    )
    # Declared only to refuse it: otherwise argparse would take "--api-key sk-..." as an abbreviation of
    # --api-key-env and the key would end up in an error message.
    group.add_argument("--api-key", nargs="?", action=_RefuseKeyAction, help=argparse.SUPPRESS)
    group.add_argument("--local-model", metavar="PATH", default=None, help="generate locally with transformers")
    group.add_argument("--vllm-model", metavar="PATH", default=None, help="generate locally with vLLM")
    group.add_argument("--max-concurrency", type=_positive_int, default=8, help="parallel HTTP requests (default: 8)")
    group.add_argument("--timeout", type=_positive_float, default=60.0, help="seconds per HTTP attempt (default: 60)")
    group.add_argument("--max-retries", type=_non_negative_int, default=5, help="retries per request (default: 5)")
    group.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per batch, --local-model only")
    group.add_argument("--device", default=None, help="device for --local-model, e.g. cuda:0 (default: auto)")
    group.add_argument("--dtype", default=None, help="weights dtype for --local-model, e.g. bfloat16")


def _add_sampling_arguments(group: argparse._ArgumentGroup) -> None:
    # Defaults are None so that a builder's own defaults (see sampling_from_args) apply unless the user overrides.
    group.add_argument("--temperature", type=_non_negative_float, default=None, help="0 = greedy (default: 0)")
    group.add_argument("--top-p", type=_probability, default=None, help="nucleus sampling mass (default: 1)")
    group.add_argument("--max-tokens", type=_positive_int, default=None, help="completion length cap (default: 512)")
    group.add_argument("--seed", type=int, default=None, help="sampling seed, where the backend supports one")


def sampling_from_args(args: argparse.Namespace, defaults: SamplingParams | None = None) -> SamplingParams:
    """Builds sampling settings: the command-line values where given, else ``defaults``.

    Args:
        args: Parsed arguments of a parser set up with :func:`add_backend_arguments`.
        defaults: The builder's own defaults (e.g. ``SamplingParams(temperature=0.7)``); library defaults if None.

    Returns:
        The sampling settings.
    """
    fields = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens, "seed": args.seed}
    given = {name: value for name, value in fields.items() if value is not None}
    return dataclasses.replace(defaults or SamplingParams(), **given)


def backend_from_args(args: argparse.Namespace) -> Backend:
    """Builds the backend the command line asks for.

    Args:
        args: Parsed arguments of a parser set up with :func:`add_backend_arguments`.

    Returns:
        A vLLM, transformers or OpenAI-compatible backend.

    Raises:
        BackendConfigError: If no backend or more than one is asked for, a URL comes without a model (or the
            reverse), or ``--api-key-env`` names an unset variable.
    """
    local = [flag for flag, value in (("--local-model", args.local_model), ("--vllm-model", args.vllm_model)) if value]
    if args.base_url:
        local.insert(0, "--base-url")
    if len(local) > 1:
        raise BackendConfigError(f"choose one backend, got {' and '.join(local)}")
    if args.vllm_model:
        from .vllm_backend import VLLMBackend

        return VLLMBackend(args.vllm_model)
    if args.local_model:
        from .transformers_backend import TransformersBackend

        return TransformersBackend(args.local_model, batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    return _http_backend(args)


def _http_backend(args: argparse.Namespace) -> Backend:
    base_url = args.base_url or os.environ.get(BASE_URL_ENV)
    model = args.model or os.environ.get(MODEL_ENV)
    if not base_url or not model:
        wanted = (("--base-url", BASE_URL_ENV, base_url), ("--model", MODEL_ENV, model))
        missing = " and ".join(f"{flag} (or {env})" for flag, env, value in wanted if not value)
        raise BackendConfigError(
            f"no generation backend: give {missing} for an OpenAI-compatible server, "
            "or --local-model PATH / --vllm-model PATH to generate locally"
        )
    from .openai_backend import OpenAICompatibleBackend

    return OpenAICompatibleBackend(
        base_url,
        model,
        api_key=api_key_from_env(args.api_key_env),
        max_concurrency=args.max_concurrency,
        timeout=args.timeout,
        max_retries=args.max_retries,
    )


def api_key_from_env(name: str | None) -> str | None:
    """The API key in environment variable ``name`` (None: the backend's own fallbacks).

    Raises:
        BackendConfigError: The variable is not set or empty.
    """
    if name is None:
        return None  # the backend's own fallbacks: SWIFT_API_KEY, OPENAI_API_KEY, else no auth
    value = os.environ.get(name)
    if not value:
        raise BackendConfigError(f"--api-key-env {name}: environment variable {name} is not set or empty")
    return value


class _RefuseKeyAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        # The value is deliberately not echoed.
        parser.error("the API key is never taken on the command line; export it and pass --api-key-env NAME")


def _env_var_name(text: str) -> str:
    if not _ENV_NAME.fullmatch(text):
        # Not echoed either: a user who got this wrong has probably pasted the key itself.
        raise argparse.ArgumentTypeError("expected the NAME of an environment variable (letters, digits, _)")
    return text


def _number(kind: type, check, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


_positive_int = _number(int, lambda v: v > 0, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number(float, lambda v: v > 0, "a positive number")
_non_negative_float = _number(float, lambda v: v >= 0, "a non-negative number")
_probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
