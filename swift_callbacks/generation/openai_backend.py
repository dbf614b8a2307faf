"""A backend for any OpenAI-compatible chat-completions server (OpenAI, vLLM serve, SGLang, llama.cpp, ...).

Requests run concurrently on a bounded thread pool and come back as they finish. Retries are ours, not the
client's, so that their policy is explicit and testable: 408, 409, 429, 5xx, timeouts and dropped connections
are retried with exponential backoff and jitter (or the server's ``Retry-After``); any other 4xx is final.

The API key is held only by the ``openai`` client object: it is never logged, printed, put in a repr, an error
text or the cache.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from ..errors import HTTP_THREAD_PREFIX
from .base import GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)

API_KEY_ENV_VARS = ("SWIFT_API_KEY", "OPENAI_API_KEY")
NO_AUTH_PLACEHOLDER = "EMPTY"  # what local servers without auth (vLLM, SGLang) accept by convention
RETRY_STATUS = frozenset({408, 409, 429})
RETRY_AFTER_CAP = 120.0  # a server asking for longer than this is waited on only this long per attempt
_REDACTED = "<redacted>"


def resolve_api_key(api_key: str | None = None) -> str:
    """Picks the API key: the argument, else ``SWIFT_API_KEY``, else ``OPENAI_API_KEY``, else ``"EMPTY"``.

    Args:
        api_key: An explicit key, or ``None``.

    Returns:
        The key to send (``"EMPTY"`` for servers without auth).
    """
    if api_key:
        return api_key
    for var in API_KEY_ENV_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return NO_AUTH_PLACEHOLDER


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Reads how long a server asked us to wait.

    Args:
        headers: Response headers (case-insensitive mapping, as ``httpx`` gives).
        now: Current time for HTTP-date values; defaults to ``time.time()``.

    Returns:
        Seconds to wait (never negative) from ``retry-after-ms`` (OpenAI's extension) or ``Retry-After`` (seconds
        or an HTTP date), or ``None`` when absent or unreadable.
    """
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            seconds = _http_date_delay(value, now)
        if seconds is not None and math.isfinite(seconds):
            return max(0.0, seconds)
    return None


def _http_date_delay(value: str, now: float | None) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when.timestamp() - (time.time() if now is None else now)


class OpenAICompatibleBackend:
    """Chat completions over HTTP through the official ``openai`` client.

    Args:
        base_url: Server URL including the API prefix, e.g. ``"http://127.0.0.1:8000/v1"``.
        model: Model name the server knows.
        api_key: Key to send; ``None`` reads ``SWIFT_API_KEY`` then ``OPENAI_API_KEY``, else sends ``"EMPTY"``.
        max_concurrency: Most requests in flight at once.
        timeout: Seconds allowed for connecting, and for each read/write of one attempt.
        max_retries: Retries after the first attempt for retryable failures.
        backoff: First retry delay in seconds; doubles each retry (with jitter).
        backoff_max: Largest backoff delay in seconds.
        extra_body: Extra JSON fields sent with every request (e.g. ``{"top_k": 20}`` for vLLM).

    Raises:
        ImportError: If the ``openai`` package is missing.
        ValueError: On a non-positive concurrency, negative retries or non-positive timeout.
    """

    name = "openai"
    supports_completion = True  # answers GenerationRequest.completion (raw text) as well as chat requests

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        _check_settings(max_concurrency, timeout, max_retries, backoff, backoff_max)
        try:
            import openai
        except ImportError as err:  # pragma: no cover - openai is a core dependency
            raise ImportError("OpenAICompatibleBackend needs the 'openai' package: pip install 'openai>=1.40'") from err
        self.base_url = base_url
        self.model = model
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.extra_body = dict(extra_body or {})
        # The cache identity: another server, or other extra fields (chat_template_kwargs, top_k), answer differently.
        extra = json.dumps(self.extra_body, sort_keys=True, ensure_ascii=False, default=str) if self.extra_body else ""
        self.cache_identity = f"{model}@{base_url.rstrip('/')}" + (f"#{extra}" if extra else "")
        key = resolve_api_key(api_key)
        self._scrub = _Scrubber(key)
        # max_retries=0: the client's own retries would hide attempts from our policy and double the wait.
        self._client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout)
        self._rng = random.Random()
        self._rng_lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"OpenAICompatibleBackend(base_url={self.base_url!r}, model={self.model!r}, "
            f"max_concurrency={self.max_concurrency}, timeout={self.timeout}, max_retries={self.max_retries})"
        )

    def generate(self, requests: list[GenerationRequest]) -> Iterator[GenerationResult]:
        """Sends the requests concurrently and yields each result as soon as it is final.

        At most ``2 * max_concurrency`` requests are queued at a time, so a huge list does not become a huge pile
        of futures, and stopping the iteration early cancels whatever has not started.

        Args:
            requests: Requests to answer.

        Yields:
            One result per request, in completion order; failures carry ``error`` (the key is never in it).
        """
        if not requests:
            return
        stop = threading.Event()
        todo = iter(requests)
        pool = ThreadPoolExecutor(
            max_workers=min(self.max_concurrency, len(requests)), thread_name_prefix=HTTP_THREAD_PREFIX
        )
        pending: set[Future[GenerationResult]] = set()
        try:
            self._refill(pool, todo, pending, stop)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                self._refill(pool, todo, pending, stop)
                for future in done:
                    yield future.result()
        finally:
            stop.set()  # wakes retry sleeps so an abandoned run winds down quickly
            pool.shutdown(wait=False, cancel_futures=True)

    def _refill(
        self,
        pool: ThreadPoolExecutor,
        todo: Iterator[GenerationRequest],
        pending: set[Future[GenerationResult]],
        stop: threading.Event,
    ) -> None:
        while len(pending) < 2 * self.max_concurrency:
            req = next(todo, None)
            if req is None:
                return
            pending.add(pool.submit(self._answer, req, stop))

    def _answer(self, req: GenerationRequest, stop: threading.Event) -> GenerationResult:
        """Runs one request through its attempts; never raises."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._call(req)
            except Exception as err:  # classify every failure: the contract is one result per request
                delay = self._retry_delay(err, attempt)
                reason = self._scrub(_describe(err))
                fatal = self._fatal(err)
            if delay is None or attempt > self.max_retries or stop.is_set():
                tries = f"after {attempt} attempt{'s' if attempt > 1 else ''}"
                logger.warning("request %r failed %s: %s", req.key, tries, reason)
                return GenerationResult(req.key, error=f"{reason} ({tries})", fatal=fatal)
            logger.debug("request %r attempt %d failed (%s); retrying in %.2f s", req.key, attempt, reason, delay)
            if stop.wait(delay):
                return GenerationResult(req.key, error=f"{reason} (cancelled before retry)")

    def _call(self, req: GenerationRequest) -> GenerationResult:
        """One HTTP attempt; raises the client's exception on failure, ``_BadReply`` on an unusable answer.

        Chat requests go to ``/v1/chat/completions``; completion requests (raw text) to ``/v1/completions``.
        """
        p = req.params
        options = {
            "model": self.model,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": p.max_tokens,
            "n": p.n,
            **({"seed": p.seed} if p.seed is not None else {}),
            **({"stop": list(p.stop)} if p.stop else {}),
            **({"extra_body": self.extra_body} if self.extra_body else {}),
        }
        if req.is_completion:
            return _to_result(req, self._client.completions.create(prompt=req.prompt, **options), lambda c: c.text)
        response = self._client.chat.completions.create(messages=req.message_dicts(), **options)
        return _to_result(req, response, lambda c: c.message.content)

    def _fatal(self, err: Exception) -> str | None:
        """What to tell the user when ``err`` will fail every request alike; None for a failure of this one."""
        import openai

        where = f"the server at {self.base_url}"
        if isinstance(err, openai.APIConnectionError) and _refused(err):
            return f"cannot connect to {where} (is it running, and is the URL right?)"
        status = getattr(err, "status_code", None)
        if status in (401, 403):
            return (f"{where} refused the API key (HTTP {status}); set the right key in the variable the backend "
                    "reads (--api-key-env, default SWIFT_API_KEY, then OPENAI_API_KEY)")  # fmt: skip
        if status == 404:
            return (f"{where} answered 404 for model {self.model!r}: the model name or the URL path (it usually "
                    "ends in /v1) is wrong")  # fmt: skip
        return None

    def _retry_delay(self, err: Exception, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` when ``err`` is not worth retrying."""
        import openai

        if isinstance(err, openai.APIConnectionError):  # includes APITimeoutError and dropped connections
            return self._backoff(attempt)
        if isinstance(err, _BadReply | openai.APIResponseValidationError):  # a 200 with an unusable body: ask again
            return self._backoff(attempt)
        if isinstance(err, openai.APIStatusError):
            status = err.status_code
            if status not in RETRY_STATUS and status < 500:
                return None
            asked = parse_retry_after(err.response.headers)
            return min(asked, RETRY_AFTER_CAP) if asked is not None else self._backoff(attempt)
        return None

    def _backoff(self, attempt: int) -> float:
        # "Equal jitter": half the exponential delay is guaranteed, half is random, so clients spread out but
        # never hammer the server with near-zero waits.
        base = min(self.backoff_max, self.backoff * 2 ** (attempt - 1))
        with self._rng_lock:
            return base / 2 + self._rng.uniform(0, base / 2)


class _Scrubber:
    """Removes the key from error texts (servers sometimes echo it back); its repr shows nothing."""

    def __init__(self, secret: str) -> None:
        # The no-auth placeholder is not a secret, and scrubbing it would mangle ordinary words.
        self._secret = secret if secret != NO_AUTH_PLACEHOLDER else ""

    def __call__(self, text: str) -> str:
        return text.replace(self._secret, _REDACTED) if self._secret else text

    def __repr__(self) -> str:
        return "_Scrubber(<redacted>)"


class _BadReply(Exception):
    """The server answered 200 but the answer cannot be used (too few choices, no text)."""


def _to_result(req: GenerationRequest, response: Any, text_of: Any) -> GenerationResult:
    choices = sorted(response.choices or [], key=lambda c: c.index)
    if len(choices) < req.params.n:
        raise _BadReply(f"server returned {len(choices)} choice(s), {req.params.n} requested")
    texts = [text_of(c) for c in choices[: req.params.n]]
    if any(t is None for t in texts):
        raise _BadReply("a choice has no text content (refusal or tool call)")
    usage = response.usage
    return GenerationResult(
        req.key,
        texts=texts,
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        finish_reasons=[getattr(c, "finish_reason", None) for c in choices[: req.params.n]],
    )


def _refused(err: BaseException) -> bool:
    """Whether a connection error is a connection that could not be opened (refused, unknown host) - which repeats
    for every request - rather than one dropped or timed out mid-request, which may not."""
    seen: BaseException | None = err
    for _ in range(8):  # the client wraps its HTTP library's error (raise ... from); follow the chain a few links
        if seen is None:
            return False
        if type(seen).__name__ == "ConnectError":  # by name: the client's HTTP library varies across versions
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _describe(err: Exception) -> str:
    status = getattr(err, "status_code", None)
    head = f"{type(err).__name__}" + (f" (HTTP {status})" if status is not None else "")
    return f"{head}: {err}"


def _check_settings(max_concurrency: int, timeout: float, max_retries: int, backoff: float, backoff_max: float) -> None:
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    if backoff < 0 or backoff_max < 0:
        raise ValueError(f"backoff and backoff_max must be >= 0, got {backoff} and {backoff_max}")
