"""A persistent, crash-safe cache of generation answers in one SQLite file.

One row per request cache key (see :meth:`GenerationRequest.cache_key`); the value is a small JSON document
holding the texts, the token counts and the time it was stored. Every successful answer is committed within
milliseconds of its arrival, so a build killed half way keeps what it had already paid for (a kill or a power
cut may lose the last few answers, which a rerun asks again). Failures are never stored: a rerun asks again.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError
from .base import GenerationResult

logger = logging.getLogger(__name__)

CACHE_FILENAME = "generations.sqlite"
_SCHEMA = "CREATE TABLE IF NOT EXISTS generations (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_LOOKUP_CHUNK = 500  # stays under SQLite's limit on bound parameters in one statement
_INSERT = "INSERT OR REPLACE INTO generations (key, value) VALUES (?, ?)"


class CacheError(UserError):
    """The cache database cannot be opened, read or written (a damaged file, a full disk, no permission)."""


def _cache_error(path: Path, err: BaseException) -> CacheError:
    return CacheError(
        f"generation cache {path}: {err}. Free space or fix its permissions, delete the file if it is damaged, or "
        "use another cache directory (--cache-dir)."
    )


class GenerationCache:
    """Answers already generated, keyed by request cache key.

    Writes go through one background writer thread that commits whatever has queued since its last commit in one
    transaction (group commit): the thread that reads the backend's answers only queues them, and never waits for
    the database while requests are in flight. An answer is committed within one commit's time of ``put`` (a few
    milliseconds), so a build killed with ``kill -9`` loses at most the answers queued at that instant, which a
    rerun asks again; :meth:`flush` and :meth:`close` wait until everything queued is committed. WAL mode lets
    another process (a second build over the same cache directory) read while this one writes.

    Args:
        cache_dir: Directory of the cache; created if missing. The database is ``<cache_dir>/generations.sqlite``.
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.path = Path(cache_dir) / CACHE_FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one statement at a time on the shared connection
        try:
            self._conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL under WAL: a commit is in the operating system's hands when it returns, so a killed process
            # keeps every committed answer; only a power cut or an OS crash can lose the latest commits (never
            # corrupting the file). FULL would fsync every commit.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(_SCHEMA)
        except (sqlite3.Error, OSError) as err:
            raise _cache_error(self.path, err) from err
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="generation-cache", daemon=True)
        self._writer.start()
        self._pid = os.getpid()  # a forked child has no writer thread: it must open its own cache
        # A script that never closes the cache still gets what it put: committed when the interpreter exits.
        self._at_exit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)

    def __repr__(self) -> str:
        return f"GenerationCache({str(self.path)!r})"

    def __len__(self) -> int:
        self.flush()
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
        """Looks up many answers at once (answers queued by :meth:`put` are committed first).

        Args:
            cache_keys: Cache keys to look up.

        Returns:
            The hits, by cache key; see :meth:`get` for the form of each.
        """
        self.flush()
        keys = list(dict.fromkeys(cache_keys))
        hits: dict[str, GenerationResult] = {}
        with self._lock:
            try:
                for start in range(0, len(keys), _LOOKUP_CHUNK):
                    chunk = keys[start : start + _LOOKUP_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    rows = self._conn.execute(f"SELECT key, value FROM generations WHERE key IN ({marks})", chunk)
                    hits.update((key, _decode(value)) for key, value in rows)
            except sqlite3.Error as err:
                raise _cache_error(self.path, err) from err
        return hits

    def put(self, cache_key: str, result: GenerationResult) -> None:
        """Queues a successful answer; the writer thread commits it within one commit's time.

        Args:
            cache_key: The request's cache key.
            result: The answer; only its texts and token counts are stored (never its caller key).

        Raises:
            ValueError: If ``result`` is a failure; failures must be retried, not remembered.
            CacheError: An earlier write failed (a full disk, say); nothing more is accepted.
        """
        if not result.ok:
            raise ValueError("failed results are not cached")
        self._raise_write_error()
        if self._closed:
            raise ValueError(f"{self!r} is closed")
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
        self._queue.put((cache_key, value))

    def flush(self) -> None:
        """Waits until every queued answer is committed.

        Raises:
            CacheError: A write failed; the answers it carried are not stored.
        """
        self._raise_write_error()  # first: in a forked child the join below would wait forever
        if not self._closed:
            self._queue.join()
        self._raise_write_error()

    def close(self) -> None:
        """Commits what is queued, stops the writer and closes the database (idempotent).

        Raises:
            CacheError: A write failed; the answers it carried are not stored.
        """
        if os.getpid() != self._pid:  # a forked child's copy: the parent's connection and writer are not its own
            self._closed = True
            return
        if not self._closed:
            self._closed = True
            atexit.unregister(self._at_exit)  # (many caches in one process leave no exit handlers behind)
            self._queue.put(None)
            self._writer.join()
            with self._lock:
                self._conn.close()
        self._raise_write_error()

    def __enter__(self) -> GenerationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_loop(self) -> None:
        """Commit every answer queued since the last commit in one transaction, until ``None`` arrives."""
        while True:
            batch = [self._queue.get()]
            while batch[-1] is not None:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [item for item in batch if item is not None]
            if rows and self._error is None:
                try:
                    with self._lock:
                        self._conn.execute("BEGIN")
                        try:
                            self._conn.executemany(_INSERT, rows)
                        except BaseException:
                            self._conn.execute("ROLLBACK")
                            raise
                        self._conn.execute("COMMIT")
                except BaseException as err:  # kept for the caller's next put/flush/close, never lost
                    self._error = err
            for _ in batch:
                self._queue.task_done()
            if batch[-1] is None:
                return

    def _raise_write_error(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(f"{self!r} was opened in another process (before a fork); open a new one here")
        if self._error is not None:
            if isinstance(self._error, sqlite3.Error | OSError):
                raise _cache_error(self.path, self._error) from self._error
            raise self._error


def _close_at_exit(ref: weakref.ref) -> None:
    cache = ref()
    if cache is not None and not cache._closed and os.getpid() == cache._pid:
        try:
            cache.close()
        except Exception as err:  # at exit: say it, do not mask the exit status
            logger.error("%s: answers queued at exit were not stored: %s", cache.path, err)


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
