"""``openai`` backend: any OpenAI-compatible chat-completions server (vLLM, Ollama, llama.cpp server, APIs).

Each batched call sends one request per item concurrently (``httpx.AsyncClient``, at most ``concurrency``
in flight), spreading them round-robin over one or more base URLs, so a batch of items costs about one
request latency per round instead of one per item. Images travel inline as base64 JPEG data URLs.

Requests that fail with 429, 5xx, a timeout, a connection error or a malformed body are retried with
exponential backoff and full jitter (honouring ``Retry-After``); other 4xx answers are not retried. After the
last attempt the item gets a failure record naming the URL and the last error, instead of an exception.

The async client lives on a private event loop in a daemon thread, so the synchronous captioning loop can
call it and connections are kept alive across rounds.

The API key follows the real route (:mod:`captioning.backends.routes`): each base URL's route -- direct or
through a proxy from the environment -- is decided once, checked (no plain-http hop to another machine carries
the key), and used as the client's transport, so httpx never picks another proxy behind the check's back. Error
texts that reach failure records have the key redacted, even when a server echoes it back.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import random
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from PIL import Image

from capret.errors import ConfigError
from captioning.backends.base import CaptionBackend, register_backend
from captioning.backends.routes import Route, check_key_route, redact, route_for
from captioning.types import ChatRequest, Generation, VisualQuery

__all__ = ["API_KEY_ENV_VARS", "OpenAIBackend", "image_data_url", "resolve_api_key"]

#: Environment variables read for the API key, first set one wins (never a command-line value). OPENAI_API_KEY
#: is read only when every base URL is the hosted OpenAI API over https (see :func:`resolve_api_key`).
API_KEY_ENV_VARS = ("CAPRET_API_KEY", "OPENAI_API_KEY")
HOSTED_API_HOSTS = ("api.openai.com",)


def resolve_api_key(
    base_urls: Sequence[str],
    *,
    api_key: str | None = None,
    api_key_env: str | None = None,
    routes: Sequence[Route] | None = None,
) -> str | None:
    """The API key to send to ``base_urls``, or None; keys only go where they were meant to.

    A user with ``$OPENAI_API_KEY`` set for the hosted API must not leak it to every local or LAN server they
    try, so: ``$OPENAI_API_KEY`` is used only when every URL is the hosted API over https; any other server takes
    a key only from ``api_key_env`` (``--api-key-env NAME``) or ``$CAPRET_API_KEY`` (or an explicit
    ``api_key``); and no key is ever sent over plain http to a host other than loopback, where anyone on the
    path could read it -- judged on the real route, proxies from the environment included (``routes``: the
    route of each URL, default :func:`~captioning.backends.routes.route_for` of each).

    Raises:
        ValueError: ``api_key_env`` names an unset variable, or a key would travel over plain http to a
            non-loopback host or proxy.
    """
    parsed = [urlsplit(u) for u in base_urls]
    if api_key is None and api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {api_key_env}: that environment variable is not set or empty")
    if api_key is None:
        api_key = os.environ.get("CAPRET_API_KEY") or None
    hosted = all(p.scheme == "https" and (p.hostname or "") in HOSTED_API_HOSTS for p in parsed)
    if api_key is None and hosted:
        api_key = os.environ.get("OPENAI_API_KEY") or None
    if api_key:
        check_key_route(routes if routes is not None else [route_for(u) for u in base_urls])
    return api_key


T = TypeVar("T")


def image_data_url(image: Image.Image, *, quality: int = 90) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Fatal(Exception):
    pass


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


def _excerpt(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


@register_backend("openai")
class OpenAIBackend(CaptionBackend):
    """Chat-completions client; ``vlm`` answers about images, ``llm`` (default: ``vlm``) asks and summarises."""

    name = "openai"

    def __init__(
        self,
        *,
        base_urls: Sequence[str],
        vlm: str,
        llm: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if not base_urls:
            raise ConfigError(
                "the openai backend needs at least one --base-url (e.g. http://localhost:8000/v1)"
            )
        bad = [u for u in base_urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise ConfigError(f"--base-url {bad[0]!r} must start with http:// or https://")
        if not vlm:
            raise ConfigError("the openai backend needs --vlm (the model name the server serves)")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ConfigError(
                f"need concurrency >= 1, max_retries >= 0, timeout > 0; got {concurrency}, {max_retries}, {timeout}"
            )
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.vlm = vlm
        self.llm = llm or vlm
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.temperature = temperature
        self.seed = seed
        # One route per base URL, decided once: the key rule checks it and the client uses it.
        self.routes = {url: route_for(url) for url in self.base_urls}
        api_key = resolve_api_key(
            self.base_urls, api_key=api_key, api_key_env=api_key_env, routes=list(self.routes.values())
        )
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._secrets = [api_key] if api_key else []
        self._urls = itertools.cycle(self.base_urls)
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="capret-openai", daemon=True)
        self._thread.start()
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._semaphore: asyncio.Semaphore | None = None
        self._image_urls: dict[
            tuple[str, int, int], str
        ] = {}  # each item's view is encoded once, not per round

    def describe(self) -> dict[str, Any]:
        return {
            "vlm": self.vlm,
            "llm": self.llm,
            "temperature": self.temperature,
            "seed": self.seed,
            "servers": len(self.base_urls),
        }

    # --- event loop plumbing --------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _client_for(self, url: str) -> httpx.AsyncClient:
        """The client for base URL ``url``, on the route that was checked (an explicit transport: httpx applies
        no environment proxy of its own to a client given one)."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.concurrency)
        client = self._clients.get(url)
        if client is None:
            limits = httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            )
            transport = httpx.AsyncHTTPTransport(limits=limits, proxy=self.routes[url].proxy)
            client = httpx.AsyncClient(transport=transport, headers=self._headers)
            self._clients[url] = client
        return client

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def shutdown() -> None:
            for client in self._clients.values():
                await client.aclose()

        self._run(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    # --- one request with retries ---------------------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full-jitter exponential backoff (AWS architecture blog), at least the server's Retry-After."""
        delay = self._rng.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))
        return max(delay, min(retry_after or 0.0, self.backoff_max))

    async def _attempt(self, client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> Generation:
        assert self._semaphore is not None
        async with self._semaphore:
            try:
                response = await client.post(f"{url}/chat/completions", json=payload, timeout=self.timeout)
            except httpx.TimeoutException:
                raise _Retryable(f"timeout after {self.timeout:g}s") from None
            except httpx.TransportError as exc:
                raise _Retryable(f"connection error: {type(exc).__name__}: {exc}") from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retryable(
                f"HTTP {status}: {_excerpt(response.text)}",
                _parse_retry_after(response.headers.get("retry-after")),
            )
        if status != 200:
            raise _Fatal(f"HTTP {status}: {_excerpt(response.text)} (not retried)")
        try:
            body = response.json()
            content = body["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError(f"content is {type(content).__name__}")
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise _Retryable(
                f"malformed response ({type(exc).__name__}: {exc}): {_excerpt(response.text)}"
            ) from None
        usage = body.get("usage") or {}
        return Generation(
            text=content,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )

    async def _request(self, payload: dict[str, Any]) -> Generation:
        reason = ""
        url = ""
        for attempt in range(self.max_retries + 1):
            url = next(self._urls)
            try:
                return await self._attempt(await self._client_for(url), url, payload)
            except _Fatal as exc:
                return Generation(text="", error=redact(f"{url}: {exc}", self._secrets))
            except _Retryable as exc:
                reason = exc.reason
                if attempt < self.max_retries:
                    await asyncio.sleep(self._backoff(attempt, exc.retry_after))
        error = f"{url}: failed after {self.max_retries + 1} attempts; last error: {reason}"
        return Generation(text="", error=redact(error, self._secrets))  # a server may echo the key back

    async def _gather(self, payloads: list[dict[str, Any]]) -> list[Generation]:
        return list(await asyncio.gather(*(self._request(p) for p in payloads)))

    # --- the two calls --------------------------------------------------------------------------------

    def _payload(self, model: str, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
        }
        if self.seed is not None:
            payload["seed"] = self.seed
        return payload

    def ask(self, requests: Sequence[ChatRequest], *, max_tokens: int) -> list[Generation]:
        payloads = [self._payload(self.llm, r.messages, max_tokens) for r in requests]
        return self._run(self._gather(payloads))

    def answer(self, queries: Sequence[VisualQuery], *, max_tokens: int) -> list[Generation]:
        payloads = []
        for query in queries:
            cache_key = (query.context.key, query.image.width, query.image.height)
            url = self._image_urls.get(cache_key) or image_data_url(query.image)
            if len(self._image_urls) > 4096:
                self._image_urls.clear()
            self._image_urls[cache_key] = url
            messages = [_fill_image(m, url) for m in query.messages]
            payloads.append(self._payload(self.vlm, messages, max_tokens))
        return self._run(self._gather(payloads))


def _fill_image(message: dict[str, Any], data_url: str) -> dict[str, Any]:
    """Replace ``{"type": "image"}`` parts by OpenAI ``image_url`` parts; text-only system parts become strings
    (some servers reject list content in system messages)."""
    content = message["content"]
    if isinstance(content, str):
        return message
    if message["role"] == "system" and all(p.get("type") == "text" for p in content):
        return {"role": "system", "content": "\n".join(p["text"] for p in content)}
    parts = [
        {"type": "image_url", "image_url": {"url": data_url}} if p.get("type") == "image" else p
        for p in content
    ]
    return {"role": message["role"], "content": parts}
