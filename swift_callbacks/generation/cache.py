"""A persistent, crash-safe cache of generation answers in one SQLite file.

One row per request cache key (see :meth:`GenerationRequest.cache_key`); the value is a small JSON document
holding the texts, the token counts and the time it was stored. Every successful answer is committed on its
own, so a build killed half way keeps everything it had already paid for. Failures are never stored: a rerun
asks again.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from .base import GenerationResult

CACHE_FILENAME = "generations.sqlite"
_SCHEMA = "CREATE TABLE IF NOT EXISTS generations (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_LOOKUP_CHUNK = 500  # stays under SQLite's limit on bound parameters in one statement


class GenerationCache:
    """Answers already generated, keyed by request cache key.

    One connection is shared by all threads and guarded by a lock: writes are tiny and rare next to the time a
    model takes to answer, so serialising them costs nothing that matters. WAL mode lets another process (a
    second build over the same cache directory) read while this one writes.

    Args:
        cache_dir: Directory of the cache; created if missing. The database is ``<cache_dir>/generations.sqlite``.
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.path = Path(cache_dir) / CACHE_FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: each commit is fsynced, so an answer that was reported as stored survives even a power cut.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(_SCHEMA)

    def __repr__(self) -> str:
        return f"GenerationCache({str(self.path)!r})"

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0]

    def get(self, cache_key: str) -> GenerationResult | None:
        """Looks up one answer.

        Args:
            cache_key: The request's cache key.

        Returns:
            The stored answer as a result with ``cached=True`` and an empty ``key`` (the caller sets it), or
            ``None`` on a miss.
        """
        return self.get_many([cache_key]).get(cache_key)

    def get_many(self, cache_keys: Iterable[str]) -> dict[str, GenerationResult]:
        """Looks up many answers at once.

        Args:
            cache_keys: Cache keys to look up.

        Returns:
            The hits, by cache key; see :meth:`get` for the form of each.
        """
        keys = list(dict.fromkeys(cache_keys))
        hits: dict[str, GenerationResult] = {}
        with self._lock:
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = keys[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(f"SELECT key, value FROM generations WHERE key IN ({marks})", chunk)
                hits.update((key, _decode(value)) for key, value in rows)
        return hits

    def put(self, cache_key: str, result: GenerationResult) -> None:
        """Stores a successful answer and commits at once.

        Args:
            cache_key: The request's cache key.
            result: The answer; only its texts and token counts are stored (never its caller key).

        Raises:
            ValueError: If ``result`` is a failure; failures must be retried, not remembered.
        """
        if not result.ok:
            raise ValueError("failed results are not cached")
        value = json.dumps(
            {
                "texts": list(result.texts),
                "prompt_tokens": int(result.prompt_tokens),
                "completion_tokens": int(result.completion_tokens),
                "finish_reasons": list(result.finish_reasons),
                "created": time.time(),
            },
            ensure_ascii=False,
        )
        with self._lock:
            # Autocommit mode: this single statement is its own transaction, durable when it returns.
            self._conn.execute("INSERT OR REPLACE INTO generations (key, value) VALUES (?, ?)", (cache_key, value))

    def close(self) -> None:
        """Closes the database connection (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> GenerationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode(value: str) -> GenerationResult:
    data = json.loads(value)
    return GenerationResult(
        key="",
        texts=list(data["texts"]),
        prompt_tokens=int(data.get("prompt_tokens", 0)),
        completion_tokens=int(data.get("completion_tokens", 0)),
        cached=True,
        finish_reasons=list(data.get("finish_reasons") or []),
    )
