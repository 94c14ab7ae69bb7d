"""Keys follow the real route: the rule that lets an API key travel looks at where the request actually goes
(proxies from the environment included), the client uses that very route, and a server that echoes the key back
in an error body never gets it into a failures file or a message."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tiny_vlm import write_deepfashion2

from capret.errors import ConfigError
from captioning.backends import create_backend
from captioning.backends.openai_backend import resolve_api_key
from captioning.backends.routes import REDACTED, check_key_route, redact, route_for
from captioning.types import ChatRequest, ItemContext

KEY = "sk-capret-route-secret-0123456789"
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def _clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("CAPRET_API_KEY", KEY)


class _Recorder(ThreadingHTTPServer):
    """An HTTP server that records every request (line and headers) and answers like a chat server, or with an
    error body that echoes the request's headers (what a careless server or proxy does)."""

    daemon_threads = True

    def __init__(self, host: str, *, echo_status: int | None = None) -> None:
        self.seen: list[dict[str, Any]] = []
        self.echo_status = echo_status
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                headers = dict(self.headers.items())
                recorder.seen.append({"line": self.requestline, "headers": headers})
                if recorder.echo_status is not None:
                    status = recorder.echo_status
                    auth = headers.get("Authorization", "")
                    body = json.dumps(
                        {"error": {"message": f"invalid credentials {auth}", "headers": headers}}
                    )
                else:
                    status = 200
                    body = json.dumps({"choices": [{"message": {"content": "through"}}], "usage": {}})
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__((host, 0), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


@contextmanager
def _serving(host: str = "127.0.0.1", *, echo_status: int | None = None) -> Iterator[_Recorder]:
    try:
        server = _Recorder(host, echo_status=echo_status)
    except OSError as exc:
        pytest.skip(f"cannot bind {host}: {exc}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _ask(backend: Any) -> str | None:
    request = ChatRequest(
        messages=[{"role": "user", "content": "hi"}], kind="question", context=ItemContext(key="k")
    )
    try:
        [answer] = backend.ask([request], max_tokens=8)
    finally:
        backend.close()
    return answer.error or answer.text


def test_route_for_reads_the_environment_like_httpx() -> None:
    env = {"HTTP_PROXY": "http://10.0.0.5:3128", "HTTPS_PROXY": "proxy.corp:8080"}
    assert route_for("http://127.0.0.1:8000/v1", environ=env).proxy == "http://10.0.0.5:3128"
    assert route_for("https://api.example.org/v1", environ=env).proxy == "http://proxy.corp:8080"
    assert (
        route_for("http://127.0.0.1:8000/v1", environ={**env, "http_proxy": ""}).proxy is None
    )  # lower wins
    assert route_for("http://x:1/v1", environ={"ALL_PROXY": "socks5://10.0.0.9:1080"}).proxy == (
        "socks5://10.0.0.9:1080"
    )
    for no_proxy in ("127.0.0.1", "localhost,127.0.0.1", "*", " 127.0.0.1 , other"):
        assert route_for("http://127.0.0.1:8000/v1", environ={**env, "NO_PROXY": no_proxy}).proxy is None
    assert route_for("http://gpu.lan.example:80/v1", environ={**env, "no_proxy": ".example"}).proxy is None
    assert route_for("http://[::1]:8000/v1", environ={**env, "NO_PROXY": "::1"}).proxy is None
    assert route_for("http://127.0.0.1/v1", environ={**env, "REQUEST_METHOD": "GET"}).proxy is None  # httpoxy


def test_key_rule_follows_the_proxy() -> None:
    loopback = "http://127.0.0.1:8000/v1"
    with pytest.raises(ConfigError, match=r"proxy http://10\.0\.0\.5:3128 .*plain http.*NO_PROXY"):
        check_key_route([route_for(loopback, environ={"HTTP_PROXY": "http://10.0.0.5:3128"})])
    with pytest.raises(ConfigError, match="proxy"):
        check_key_route([route_for(loopback, environ={"ALL_PROXY": "socks5://10.0.0.9:1080"})])
    with pytest.raises(ConfigError) as info:  # proxy credentials never appear in the message
        check_key_route([route_for(loopback, environ={"HTTP_PROXY": "http://user:pw@10.0.0.5:3128"})])
    assert "pw" not in str(info.value) and "10.0.0.5:3128" in str(info.value)
    for allowed in ("http://127.0.0.1:3128", "http://localhost:3128", "https://proxy.corp:443"):
        check_key_route([route_for(loopback, environ={"HTTP_PROXY": allowed})])
    check_key_route(
        [route_for(loopback, environ={"HTTP_PROXY": "http://10.0.0.5:3128", "NO_PROXY": "127.0.0.1"})]
    )
    # https is tunnelled end to end: any proxy may carry it
    check_key_route(
        [route_for("https://llm.example.org/v1", environ={"HTTPS_PROXY": "http://10.0.0.5:3128"})]
    )
    with pytest.raises(ConfigError, match="non-loopback host"):
        check_key_route([route_for("http://10.0.0.7:8000/v1", environ={})])


def test_backend_refuses_a_plain_http_proxy_on_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    with _serving("192.0.2.2") as proxy:  # this machine's own non-loopback address: a proxy "on the network"
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        with pytest.raises(ConfigError, match="proxy") as info:
            create_backend("openai", base_urls=["http://127.0.0.1:9/v1"], vlm="m")
        assert KEY not in str(info.value)
        assert proxy.seen == []  # refused before anything was sent
        monkeypatch.delenv(
            "CAPRET_API_KEY"
        )  # without a key the same route is fine, and nothing secret travels
        assert _ask(
            create_backend("openai", base_urls=["http://127.0.0.1:9/v1"], vlm="m", max_retries=0)
        ) == ("through")
        assert len(proxy.seen) == 1 and "authorization" not in {h.lower() for h in proxy.seen[0]["headers"]}
        assert proxy.seen[0]["line"].startswith("POST http://127.0.0.1:9/v1/chat/completions")


def test_the_checked_route_is_the_route_used(monkeypatch: pytest.MonkeyPatch) -> None:
    with _serving() as proxy, _serving() as server:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)  # a loopback proxy: the key may go through it
        assert (
            _ask(create_backend("openai", base_urls=[f"{server.url}/v1"], vlm="m", max_retries=0))
            == "through"
        )
        assert len(proxy.seen) == 1 and server.seen == []
        assert proxy.seen[0]["headers"].get("Authorization") == f"Bearer {KEY}"
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # bypassed: straight to the server
        assert (
            _ask(create_backend("openai", base_urls=[f"{server.url}/v1"], vlm="m", max_retries=0))
            == "through"
        )
        assert len(proxy.seen) == 1 and len(server.seen) == 1


@pytest.mark.parametrize("status", [400, 500])
def test_a_server_echoing_the_key_never_gets_it_stored(status: int, tmp_path: Path, capsys: Any) -> None:
    from captioning.cli import main

    root = tmp_path / "df2"
    write_deepfashion2(root, "validation", images=2, items_per_image=1)
    out = tmp_path / "captions.jsonl"
    with _serving(echo_status=status) as server:
        error = _ask(create_backend("openai", base_urls=[f"{server.url}/v1"], vlm="m", max_retries=1,
                                    backoff_base=0.001))  # fmt: skip
        assert error is not None and KEY not in error and REDACTED in error
        argv = [
            "--root",
            str(root),
            "--out",
            str(out),
            "--backend",
            "openai",
            "--base-url",
            f"{server.url}/v1",
        ]
        main([*argv, "--vlm", "m", "--no-progress", "--set", "openai.max_retries=0"])
        assert all(seen["headers"].get("Authorization") == f"Bearer {KEY}" for seen in server.seen)
    printed = capsys.readouterr()
    failures = out.with_name("captions.failures.jsonl")
    assert failures.is_file() and REDACTED in failures.read_text()
    for text in (failures.read_text(), out.read_text() if out.exists() else "", printed.out, printed.err):
        assert KEY not in text


def test_redact_covers_json_escaped_forms() -> None:
    assert redact(f"a {KEY} b", [KEY, None]) == f"a {REDACTED} b"
    assert redact("nothing", []) == "nothing"
    assert resolve_api_key(["https://llm.example.org/v1"]) == KEY
