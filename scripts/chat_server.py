"""A small local OpenAI-compatible chat-completions server: a stand-in LLM for smoke runs, and the tests' server.

It speaks the real wire format of ``POST /v1/chat/completions`` and answers deterministically: with a responder
(``--responder arithmetic``: the stand-in of ``arithmetic_standin.py``, which plays the strong-LLM roles of the
ScaleQuest pipeline on one-step arithmetic word problems), or with a pure function of the last user message
(``"echo: <content>"``, or a text set per message). From the command line::

    python scripts/chat_server.py --responder arithmetic --port 8631   # serves http://127.0.0.1:8631/v1

then point an ``openai`` backend at it (any model name and API key; nothing is checked), as
``recipes/scalequest/pipeline_tiny_cpu.yaml`` does. It listens on 127.0.0.1 unless ``--host`` says otherwise. It
says nothing about the quality of a method: a real run uses real models.

In tests (``ChatServer()`` on a port the OS picks) every request is counted per message hash, and faults can be
injected per message content (by attempt) or per request number:

- ``"429"``: rate limited, with ``Retry-After`` (0 s unless set)
- any other HTTP status code as a string (``"500"``, ``"400"``, ``"409"``, ...): that status with an error body
- ``"401-echo"``: unauthorized, echoing the ``Authorization`` header back in the error (secret-leak test)
- ``"slow"``: sleep past the client's timeout, then drop the connection
- ``"drop"``: close the socket without any response
- ``"short"``: a 200 answer with a single choice whatever ``n`` was asked for

Every wait is on the server's stop event, so stopping the server ends all of them at once.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NAMED_FAULTS = ("401-echo", "slow", "drop", "short")


def _valid_fault(fault: str) -> bool:
    return fault in NAMED_FAULTS or (fault.isdigit() and 400 <= int(fault) <= 599)


def message_hash(content: str) -> str:
    """Short stable hash of a last user message, the unit the server counts requests by."""
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


Responder = Callable[[dict[str, Any]], str | list[str]]


class ChatServer:
    """A threaded server; use as a context manager or call :meth:`start` / :meth:`stop`.

    Args:
        delay: Seconds every successful reply waits before answering (to make builds slow enough to kill).
        slow_seconds: How long a ``"slow"`` fault sleeps (keep it above the client's timeout).
        retry_after: Value of the ``Retry-After`` header sent with ``"429"``.
        replies: Reply texts by last user message; others get ``"echo: <content>"`` (without a responder).
        hold_after: If set, only this many requests are answered; every later one hangs until the server stops
            or ``hold_after`` is cleared for new requests (models a build killed with requests in flight).
        responder: Answers every successful request from its JSON body (``messages``, ``n``): one text, or a list
            of ``n`` texts; instead of ``replies`` and the echo.
        host: Address to listen on.
        port: Port to listen on (0: one the OS picks; see :attr:`base_url`).
    """

    def __init__(
        self,
        *,
        delay: float = 0.0,
        slow_seconds: float = 5.0,
        retry_after: str = "0",
        replies: dict[str, str] | None = None,
        hold_after: int | None = None,
        responder: Responder | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.delay = delay
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.replies = dict(replies or {})
        self.hold_after = hold_after
        self.responder = responder
        self.address = (host, port)
        self.counts: Counter[str] = Counter()  # requests seen, by message hash
        self.ok_count = 0  # successful replies sent
        self.admitted_ok = 0  # requests admitted to a successful reply (what hold_after counts)
        self.in_flight = 0  # requests being answered right now
        self.max_in_flight = 0
        self.total = 0  # requests seen
        self.bodies: list[dict[str, Any]] = []
        self.auth_headers: list[str] = []
        self._faults: dict[str, list[str]] = {}
        self._forever: dict[str, str] = {}
        self._nth: dict[int, str] = {}
        self.nth_hits: dict[int, str] = {}  # request number -> message it hit, for faults set by inject_nth
        self._attempts: Counter[str] = Counter()  # attempts per message that injected faults are matched against
        self._lock = threading.Lock()
        self.stopped = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- configuration -------------------------------------------------------------------------------------
    def inject(self, content: str, *faults: str, forever: bool = False) -> None:
        """Makes attempts 1, 2, ... for this message fail with ``faults`` in order (or always with the first)."""
        assert faults and all(_valid_fault(f) for f in faults), faults
        if forever:
            self._forever[content] = faults[0]
        else:
            self._faults[content] = list(faults)

    def inject_nth(self, number: int, fault: str) -> None:
        """Makes the ``number``-th request the server sees (1-based, any message) fail with ``fault``."""
        assert _valid_fault(fault), fault
        self._nth[number] = fault

    def count(self, content: str) -> int:
        """Requests seen so far whose last user message is ``content``."""
        with self._lock:
            return self.counts[message_hash(content)]

    def reply_for(self, content: str, index: int = 0, n: int = 1) -> str:
        """The text the server answers for ``content`` (choice ``index`` of ``n``)."""
        text = self.replies.get(content, f"echo: {content}")
        return text if n == 1 else f"{text} #{index}"

    # -- lifecycle -----------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> ChatServer:
        self._httpd = ThreadingHTTPServer(self.address, _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()  # releases every sleeping or held handler
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling ----------------------------------------------------------------------------------
    def _admit(self, content: str) -> tuple[str | None, bool]:
        """Counts a request and decides its fate: (fault or None, hold?)."""
        with self._lock:
            self.total += 1
            self.counts[message_hash(content)] += 1
            fault = self._nth.get(self.total)
            if fault is not None:
                self.nth_hits[self.total] = content
                return fault, False  # does not use up one of the message's own scripted attempts
            self._attempts[content] += 1
            if content in self._forever:
                fault = self._forever[content]
            elif self._attempts[content] <= len(self._faults.get(content, [])):
                fault = self._faults[content][self._attempts[content] - 1]
            hold = fault is None and self.hold_after is not None and self.admitted_ok >= self.hold_after
            if fault is None and not hold:
                self.admitted_ok += 1
            return fault, hold

    def _completion(self, body: dict[str, Any], content: str, short: bool = False) -> dict[str, Any]:
        n = 1 if short else int(body.get("n") or 1)
        if self.responder is not None:
            out = self.responder(body)
            texts = (out if isinstance(out, list) else [out])[:n]
        else:
            texts = [self.reply_for(content, i, n) for i in range(n)]
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        completion_tokens = sum(len(t.split()) for t in texts)
        return {
            "id": f"chatcmpl-{message_hash(content)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                for i, t in enumerate(texts)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def _last_user_content(body: dict[str, Any]) -> str:
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    return str(users[-1].get("content", "")) if users else ""


def _make_handler(server: ChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like real servers, so dropped connections matter
        timeout = 5  # idle keep-alive connections end on their own

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet tests

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            with server._lock:
                server.bodies.append(body)
                server.auth_headers.append(self.headers.get("Authorization", ""))
            content = _last_user_content(body)
            fault, hold = server._admit(content)
            self._respond(body, content, fault, hold)

        def _respond(self, body: dict[str, Any], content: str, fault: str | None, hold: bool) -> None:
            if hold:
                server.stopped.wait(60)
                self._drop()
            elif fault in (None, "short"):
                self._succeed(body, content, short=fault == "short")
            else:
                self._fault(fault)

        def _succeed(self, body: dict[str, Any], content: str, short: bool) -> None:
            # Only answered requests count as in flight: a "slow" one the client gave up on is not its load.
            with server._lock:
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                if server.delay and server.stopped.wait(server.delay):
                    self._drop()
                    return
                payload = server._completion(body, content, short)
                with server._lock:
                    server.ok_count += 1
                self._send(200, payload)
            finally:
                with server._lock:
                    server.in_flight -= 1

        def _fault(self, fault: str) -> None:
            if fault == "429":
                error = {"message": "rate limited", "type": "rate_limit_error"}
                self._send(429, {"error": error}, {"Retry-After": server.retry_after})
            elif fault == "401-echo":
                echoed = f"invalid key in header: {self.headers.get('Authorization', '')}"
                self._send(401, {"error": {"message": echoed, "type": "invalid_request_error"}})
            elif fault == "slow":
                server.stopped.wait(server.slow_seconds)
                self._drop()
            elif fault == "drop":
                self._drop()
            else:
                self._send(int(fault), {"error": {"message": f"injected {fault}", "type": "injected_error"}})

        def _drop(self) -> None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                self.close_connection = True  # the client gave up (timeout); nothing left to do

    return Handler


def arithmetic_responder(body: dict[str, Any]) -> str | list[str]:
    """The arithmetic stand-in (``arithmetic_standin.py``, next to this script) answering one request body."""
    import arithmetic_standin  # imports swift_callbacks: the package must be installed or on PYTHONPATH

    return arithmetic_standin.answer(body.get("messages", []), int(body.get("n") or 1))


RESPONDERS: dict[str, Responder | None] = {"echo": None, "arithmetic": arithmetic_responder}


def main(argv: list[str] | None = None) -> None:
    """Runs a server in the foreground until interrupted; prints its base URL first."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--responder",
        choices=sorted(RESPONDERS),
        default="echo",
        help="how to answer: the arithmetic stand-in, or echo the last user message (default)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8631, help="port; 0 picks a free one (default: %(default)s)")
    args = parser.parse_args(argv)
    with ChatServer(responder=RESPONDERS[args.responder], host=args.host, port=args.port) as srv:
        print(srv.base_url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            srv.stopped.wait()


if __name__ == "__main__":
    main()
