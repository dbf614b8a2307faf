"""The generation loop builders use: cache first, then the backend, storing every answer as it arrives.

Example::

    gen = Generator(backend, ".swift_cache/generation", desc="cot")
    results = gen.run([GenerationRequest.chat("q1/cot", [{"role": "user", "content": "2+2?"}])])
    print(results["q1/cot"].texts, gen.stats.summary())
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from ..errors import UserError
from .base import Backend, GenerationRequest, GenerationResult, backend_identity
from .cache import GenerationCache

logger = logging.getLogger(__name__)


@dataclass
class RunStats:
    """Counts of what a run did.

    Attributes:
        requests: Requests asked for.
        cached: Requests answered from the cache.
        sent: Distinct requests handed to the backend (identical requests in one run are sent once).
        succeeded: Requests answered, from the cache or the backend.
        failed: Requests that came back with an error.
        prompt_tokens: Prompt tokens of the answers generated in this run (cache hits cost nothing).
        completion_tokens: Completion tokens of the answers generated in this run.
        seconds: Wall-clock time of the run.
    """

    requests: int = 0
    cached: int = 0
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def add(self, other: RunStats) -> None:
        """Adds another run's counts to these, field by field."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> str:
        """Returns one line for logs.

        For example ``"10 requests: 4 cached, 6 sent, 9 ok, 1 failed; tokens 120 in / 340 out; 3.2 s"``.
        """
        return (
            f"{self.requests} requests: {self.cached} cached, {self.sent} sent, {self.succeeded} ok, "
            f"{self.failed} failed; tokens {self.prompt_tokens} in / {self.completion_tokens} out; {self.seconds:.1f} s"
        )


# Requests in a row failing with the same cause that would fail every request (a rejected key, a wrong model name
# or path, a server that is down) before a run stops: enough to rule out a fluke, few enough to waste nothing.
FATAL_STREAK = 3


class GenerationAborted(UserError):
    """A run stopped because its requests kept failing with a cause that would fail them all."""


class Generator:
    """Runs chat requests through a backend with a persistent cache and a progress bar.

    Args:
        backend: Any :class:`Backend`.
        cache_dir: Directory of the on-disk cache, or ``None`` to always ask the backend.
        progress: Whether to show a tqdm progress bar (on stderr).
        desc: Label of the progress bar and the log lines.

    Attributes:
        stats: Counts summed over every :meth:`run` of this generator.
        last_stats: Counts of the most recent :meth:`run`.
    """

    def __init__(
        self,
        backend: Backend,
        cache_dir: str | os.PathLike | None,
        *,
        progress: bool = True,
        desc: str = "generate",
    ) -> None:
        self.backend = backend
        self.cache = GenerationCache(cache_dir) if cache_dir is not None else None
        self.progress = progress
        self.desc = desc
        self.stats = RunStats()
        self.last_stats = RunStats()

    def __repr__(self) -> str:
        return f"Generator(backend={self.backend!r}, cache={self.cache!r}, desc={self.desc!r})"

    def run(self, requests: list[GenerationRequest]) -> dict[str, GenerationResult]:
        """Answers every request, from the cache where possible.

        Args:
            requests: Requests with unique ``key`` values.

        Returns:
            One result per request, keyed by ``request.key``, in request order. Failed requests are present with
            ``error`` set; nothing is silently missing.

        Raises:
            ValueError: If two requests share a key (the duplicates are named).
        """
        requests = list(requests)
        _check_unique(requests)
        start = time.perf_counter()
        stats = RunStats(requests=len(requests))
        groups = self._group_by_cache_key(requests)
        results = self._from_cache(groups, stats)
        misses = {ck: reqs for ck, reqs in groups.items() if reqs[0].key not in results}
        with _progress_bar(len(requests), len(results), self.desc, self.progress) as bar:
            for cache_key, result in self._generate(misses):
                for req in misses[cache_key]:
                    results[req.key] = replace(result, key=req.key)
                self._account(result, len(misses[cache_key]), stats)
                _update_bar(bar, len(misses[cache_key]), stats)
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        self.stats.add(stats)
        logger.info("%s: %s", self.desc, stats.summary())
        return {req.key: results[req.key] for req in requests}

    def close(self) -> None:
        """Closes the cache database."""
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _group_by_cache_key(self, requests: list[GenerationRequest]) -> dict[str, list[GenerationRequest]]:
        # Identical requests share an answer in the cache anyway, so asking the backend twice would only cost money.
        groups: dict[str, list[GenerationRequest]] = {}
        identity = backend_identity(self.backend)
        for req in requests:
            groups.setdefault(req.cache_key(self.backend.name, identity), []).append(req)
        return groups

    def _from_cache(self, groups: dict[str, list[GenerationRequest]], stats: RunStats) -> dict[str, GenerationResult]:
        if self.cache is None:
            return {}
        hits = self.cache.get_many(groups)
        results = {req.key: replace(hit, key=req.key) for ck, hit in hits.items() for req in groups[ck]}
        stats.cached = stats.succeeded = len(results)
        return results

    def _generate(self, misses: dict[str, list[GenerationRequest]]) -> Iterator[tuple[str, GenerationResult]]:
        """Yields ``(cache_key, result)`` exactly once for every miss, storing successes as they come."""
        by_key = {reqs[0].key: ck for ck, reqs in misses.items()}
        todo = set(by_key)
        streak, cause = 0, None  # consecutive failures with the same fatal cause
        reason = "backend returned no result for this request"
        stream = self.backend.generate([reqs[0] for reqs in misses.values()]) if misses else iter(())
        try:
            while True:
                try:
                    result = next(stream)
                except StopIteration:
                    break
                except Exception as err:  # a backend broke its contract; keep the answers so far, report the rest
                    logger.exception("%s: backend %s failed", self.desc, self.backend.name)
                    reason = f"backend failed: {type(err).__name__}: {err}"
                    break
                if result.key not in todo:
                    logger.warning("%s: backend returned an unexpected or repeated key %r", self.desc, result.key)
                    continue
                todo.discard(result.key)
                result = replace(result, cached=False)
                streak = streak + 1 if result.fatal is not None and result.fatal == cause else int(bool(result.fatal))
                cause = result.fatal
                if cause is not None and streak >= FATAL_STREAK:
                    raise GenerationAborted(
                        f"{self.desc}: stopped after {streak} requests in a row failed the same way: {cause}. "
                        "No new request was started (any still in flight were abandoned); answers that arrived "
                        "before are kept in the cache, so a rerun asks only for the rest."
                    )
                if result.ok and self.cache is not None:
                    self.cache.put(by_key[result.key], result)
                yield by_key[result.key], result
        finally:
            # On an interrupt (Ctrl-C, an exception in the caller) this lets the backend cancel queued work now.
            if hasattr(stream, "close"):
                stream.close()
            if self.cache is not None:  # what arrived is committed before anything (an interrupt too) goes on
                self.cache.flush()
        for key in [k for k in by_key if k in todo]:
            yield by_key[key], GenerationResult(key, error=reason)

    @staticmethod
    def _account(result: GenerationResult, copies: int, stats: RunStats) -> None:
        stats.sent += 1
        if result.ok:
            stats.succeeded += copies
            stats.prompt_tokens += result.prompt_tokens
            stats.completion_tokens += result.completion_tokens
        else:
            stats.failed += copies


def _check_unique(requests: Iterable[GenerationRequest]) -> None:
    counts = Counter(req.key for req in requests)
    dupes = [key for key, count in counts.items() if count > 1]
    if dupes:
        shown = ", ".join(repr(k) for k in dupes[:10]) + (" ..." if len(dupes) > 10 else "")
        raise ValueError(f"request keys must be unique; {len(dupes)} duplicated: {shown}")


def _progress_bar(total: int, done: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm  # imported on first use, keeping the package import light

    return tqdm(total=total, initial=done, desc=desc, unit="req", disable=not enabled, dynamic_ncols=True)


def _update_bar(bar, count: int, stats: RunStats) -> None:
    bar.update(count)
    bar.set_postfix(failed=stats.failed, tokens=stats.prompt_tokens + stats.completion_tokens, refresh=False)
