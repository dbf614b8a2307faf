"""Generation cache write throughput: answers stored per second, each committed durably on its own.

    python benchmarks/bench_cache.py [N]

Stores N (default 2000) answers of ~170 characters one by one in a fresh cache (SQLite, WAL, synchronous=NORMAL,
group commit by the cache's writer thread) and prints answers per second, counted until every answer is
committed. Issue 11 asks for at least 1,000 answers/s on the project's 2-core machine.
"""

from __future__ import annotations

import sys
import tempfile
import time

from swift_callbacks.generation.base import GenerationResult
from swift_callbacks.generation.cache import GenerationCache


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory() as folder, GenerationCache(folder) as cache:
        answer = GenerationResult("k", texts=["some answer text " * 10], prompt_tokens=10, completion_tokens=40)
        start = time.perf_counter()
        for i in range(n):
            cache.put(f"k{i}", answer)
        cache.flush()  # every answer committed
        seconds = time.perf_counter() - start
    print(f"{n} answers stored in {seconds:.2f} s: {n / seconds:.0f} answers/s")


if __name__ == "__main__":
    main()
