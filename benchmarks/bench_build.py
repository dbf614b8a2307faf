"""Whole-build throughput: ``swift-study build cot`` against a local OpenAI-compatible server, next to a floor.

    python benchmarks/bench_build.py [--rows N] [--concurrency C]

The server (``scripts/chat_server.py``, answering every CoT request at once with a correct reasoning) runs in
its own process. Three measurements on the same N requests, in this order:

* **floor**: the ``openai`` client alone, C threads sending the same chat requests (no cache, no parsing, no
  files) - what the server and the client library allow on this machine;
* **build**: ``swift-study build cot`` as a user runs it (a subprocess, C concurrent requests), fresh cache;
* **rerun**: the same command again, every answer from the cache.

It prints requests per second for each. The rerun does everything the build does except the requests (start-up,
reading the input and the cache, checking every answer, writing the output), so build minus rerun is the time
the requests themselves added, compared with the floor. Exits 1 if the build did not keep every row.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from chat_server import ChatServer  # noqa: E402


def cot_reply(body: dict) -> str:
    """A correct step-by-step answer to 'What is A plus B?' (the numbers are read from the request)."""
    a, b = map(int, re.findall(r"What is (\d+) plus (\d+)\?", body["messages"][-1]["content"])[0])
    return f"We add {a} and {b}. {a} plus {b} makes {a + b}. The answer is {a + b}."


def serve(port: multiprocessing.Value, stop: multiprocessing.Event) -> None:
    with ChatServer(responder=cot_reply) as server:
        port.value = int(server.base_url.rsplit(":", 1)[1].split("/")[0])
        stop.wait()


def rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "query": f"What is {i} plus {i % 97}?", "response": str(i + i % 97)} for i in range(n)]


def floor(base_url: str, n: int, concurrency: int) -> float:
    """Seconds for the openai client alone to get n chat answers, C at a time."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)

    def ask(i: int) -> str:
        messages = [{"role": "user", "content": f"What is {i} plus {i % 97}? Think step by step."}]
        return client.chat.completions.create(model="m", messages=messages, max_tokens=256).choices[0].message.content

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(ask, range(n)))
    assert all(answers), "the server answered an empty text"
    return time.perf_counter() - start


def build(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "swift_callbacks", *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"build failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    port, stop = multiprocessing.Value("i", 0), multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(port, stop), daemon=True)
    server.start()
    while port.value == 0:
        time.sleep(0.05)
    base_url = f"http://127.0.0.1:{port.value}/v1"
    try:
        with tempfile.TemporaryDirectory() as folder:
            src, out = Path(folder) / "refs.jsonl", Path(folder) / "cot.jsonl"
            src.write_text("".join(json.dumps(r) + "\n" for r in rows(args.rows)))
            argv = ["build", "cot", "--input", str(src), "--output", str(out), "--base-url", base_url, "--model", "m",
                    "--cache-dir", str(Path(folder) / "cache"), "--max-concurrency", str(args.concurrency)]  # fmt: skip
            floor_s = floor(base_url, args.rows, args.concurrency)
            build_s, report = build(argv)
            kept = out.read_text().count("\n")
            rerun_s, _ = build(argv)
    finally:
        stop.set()
        server.join(5)
    n = args.rows
    print(f"{n} requests, concurrency {args.concurrency}, server in its own process")
    print(f"floor (openai client alone): {floor_s:6.2f} s  {n / floor_s:7.0f} requests/s")
    print(f"build (CLI, fresh cache):    {build_s:6.2f} s  {n / build_s:7.0f} requests/s")
    print(f"rerun (all cached):          {rerun_s:6.2f} s  {n / rerun_s:7.0f} requests/s")
    requests_s = build_s - rerun_s
    print(
        f"requests part (build - rerun): {requests_s:4.2f} s  {n / requests_s:7.0f} requests/s, "
        f"{requests_s / floor_s:.2f}x the floor's time"
    )
    print(f"rows kept: {kept} of {n}")
    print(report.strip().splitlines()[-1] if report.strip() else "")
    if kept != n:
        sys.exit(1)


if __name__ == "__main__":
    main()
