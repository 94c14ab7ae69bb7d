"""A loopback OpenAI-compatible chat-completions server, for tests, benchmarks and dry runs.

It speaks ``POST /v1/chat/completions`` with deterministic replies (a VLM-style answer when the request
carries an image, a question or a summary otherwise), adds a fixed latency per request, and injects faults on
demand, so the ``openai`` backend's concurrency, retries and failure records can be exercised against a real
HTTP server without any model: ``429`` (with ``Retry-After: 0``), ``500``/``503``, ``400`` (not retryable),
``timeout:<seconds>`` (reply only after that delay), ``malformed`` (a 200 with a non-JSON body), ``missing``
(a 200 JSON body without ``choices``) and ``drop`` (close the connection without replying).

Faults come from a queue (``faults``: one per request, in arrival order) or from ``fault_fn(payload)``, which
may return a fault name for a given request (e.g. always fail one item).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["ChatServer", "reply_for"]

_WORDS = ["red", "blue", "white", "black", "green", "striped", "cotton", "denim", "floral", "plain"]
_TOPICS = ["colour", "material", "pattern", "sleeve length", "neckline", "length", "fit", "closure", "logo",
           "background", "collar", "pockets"]  # fmt: skip


def _texts(payload: dict[str, Any]) -> tuple[str, str, bool]:
    """(system text, user text, has image) of a chat payload."""
    system: list[str] = []
    user: list[str] = []
    image = False
    for message in payload.get("messages", []):
        content = message.get("content", "")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part.get("type") == "image_url":
                image = True
            elif part.get("type") == "text":
                (system if message.get("role") == "system" else user).append(part["text"])
    return "\n".join(system), "\n".join(user), image


def reply_for(payload: dict[str, Any]) -> str:
    """The deterministic reply to a chat payload (same payload, same reply)."""
    system, user, image = _texts(payload)
    if image:
        digest = hashlib.sha1(json.dumps(payload["messages"], sort_keys=True).encode()).digest()
        # A run-on "Question:" as real VLMs produce; the loop must cut it (ChatCaptioner).
        return f"It looks {_WORDS[digest[0] % len(_WORDS)]}. Question: anything else?"
    if "summar" in system.lower():
        answers = [line[len("Answer:") :].strip() for line in user.splitlines() if line.startswith("Answer:")]
        return "Summary: " + " ".join(answers)
    asked = user.count("Question:")
    return f"Question: What is the {_TOPICS[asked % len(_TOPICS)]} of the item? Answer: it is"


class ChatServer:
    """Threaded HTTP server on 127.0.0.1; use as a context manager and point ``base_url`` at it."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        faults: Sequence[str] = (),
        fault_fn: Callable[[dict[str, Any]], str | None] | None = None,
        responder: Callable[[dict[str, Any]], str] = reply_for,
        port: int = 0,
    ) -> None:
        self.latency = latency
        self.fault_fn = fault_fn
        self.responder = responder
        self._faults = list(faults)
        self._lock = threading.Lock()
        self.requests = 0  # requests received
        self.faults_served: list[str] = []
        self.max_in_flight = 0
        self._in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers
            disable_nagle_algorithm = True  # else header and body writes wait on delayed ACKs (~40 ms)
            wbufsize = 1 << 16  # headers and body leave in one write (flushed after each request)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the access log
                return

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                try:
                    server._handle(self, raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test): nothing to answer

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def _next_fault(self, payload: dict[str, Any]) -> str | None:
        with self._lock:
            self.requests += 1
            fault = self._faults.pop(0) if self._faults else None
        if fault is None and self.fault_fn is not None:
            fault = self.fault_fn(payload)
        if fault is not None:
            with self._lock:
                self.faults_served.append(fault)
        return fault

    def _handle(self, handler: Any, raw: bytes) -> None:
        if handler.path.rstrip("/") != "/v1/chat/completions":
            handler._send(404, b'{"error": "not found"}')
            return
        try:
            payload = json.loads(raw)
        except json.JSONDecodeError:
            handler._send(400, b'{"error": "request body is not JSON"}')
            return
        fault = self._next_fault(payload)
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.latency:
                time.sleep(self.latency)
            if fault is not None and fault.startswith("timeout:"):
                time.sleep(float(fault.split(":", 1)[1]))
            elif fault in ("429", "500", "503", "400"):
                headers = {"Retry-After": "0"} if fault == "429" else None
                handler._send(int(fault), json.dumps({"error": f"injected {fault}"}).encode(), headers)
                return
            elif fault == "malformed":
                handler._send(200, b'{"choices": [{"message": ')
                return
            elif fault == "missing":
                handler._send(200, b'{"object": "chat.completion"}')
                return
            elif fault == "drop":
                handler.close_connection = True
                handler.connection.shutdown(2)
                return
            elif fault is not None:
                raise ValueError(f"unknown injected fault {fault!r}")
            text = self.responder(payload)
            system, user, _ = _texts(payload)
            body = {
                "id": f"cmpl-{self.requests}",
                "object": "chat.completion",
                "model": payload.get("model", ""),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {
                    "prompt_tokens": len((system + " " + user).split()),
                    "completion_tokens": len(text.split()),
                },
            }
            handler._send(200, json.dumps(body).encode())
        finally:
            with self._lock:
                self._in_flight -= 1

    def start(self) -> ChatServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="capret-loopback",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """``python -m captioning.loopback [PORT] [LATENCY]``: serve until interrupted (for manual dry runs)."""
    import sys

    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    latency = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    with ChatServer(port=port, latency=latency) as server:
        print(f"serving chat completions at {server.base_url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
