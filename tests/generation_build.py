"""A tiny generation "build" run as a separate process by the resume test (so it can be SIGKILLed).

Usage: ``python tests/generation_build.py BASE_URL CACHE_DIR OUT_JSON COUNT``. It asks for ``COUNT`` items
``item-0 .. item-{COUNT-1}`` through :class:`Generator` with two requests in flight, then writes
``{key: {"texts": [...], "error": ..., "cached": ...}}`` to ``OUT_JSON``.
"""

from __future__ import annotations

import json
import sys

from swift_callbacks.generation import GenerationRequest, Generator, OpenAICompatibleBackend, SamplingParams

PARAMS = SamplingParams(max_tokens=16)


def build_requests(count: int) -> list[GenerationRequest]:
    """The build's requests; the test rebuilds them to compute cache keys."""
    return [GenerationRequest.chat(f"k{i}", [{"role": "user", "content": f"item-{i}"}], PARAMS) for i in range(count)]


def main(base_url: str, cache_dir: str, out_json: str, count: int) -> None:
    backend = OpenAICompatibleBackend(base_url, "test-model", max_concurrency=2, timeout=30.0, max_retries=0)
    with Generator(backend, cache_dir, progress=False) as gen:
        results = gen.run(build_requests(count))
    payload = {k: {"texts": r.texts, "error": r.error, "cached": r.cached} for k, r in results.items()}
    with open(out_json, "w", encoding="utf-8") as fh:
        json.dump(payload, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
