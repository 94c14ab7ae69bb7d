"""Admission control and Host checking for ``capret serve``: memory is bounded before any pixel is decoded.

Eight concurrent uploads of a small PNG that decodes to 39.7 Mpx took a server limited to two searches from 1.0
to 5.4 GB: every upload was decoded *before* the concurrency limit applied, and the requests that then waited
for a slot held their decoded pixels for 11-15 s before getting a 503. Here a request is admitted -- or refused
at once with ``503`` and ``Retry-After`` -- from the image *header* alone (``PIL.Image.open`` reads the header,
not the pixels), against three limits:

- ``max_concurrency``: searches that run at once (each holds its decoded image and the model's activations);
- ``max_pixels``: one image's decoded size (width x height); larger is refused with 413 whatever the load;
- ``pixel_budget``: decoded pixels of all admitted requests together, so two near-maximal images cannot be
  decoded at once even when a concurrency slot is free.

A request holds its admission from before decoding until its answer is computed, so decoded pixels never exist
outside the budget. ``Retry-After`` is the recent mean service time, rounded up (at least one second).

:class:`HostCheck` rejects requests whose ``Host`` header names another host than the one the server is bound
to: a page on another site cannot reach a server on ``127.0.0.1`` through a DNS name that resolves to the
loopback address (DNS rebinding), because its requests carry that name.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from capret.errors import ConfigError

__all__ = ["Admission", "AdmissionRefused", "HostCheck", "Ticket", "allowed_hosts_for"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AdmissionRefused(Exception):
    """A request cannot start now; ``status`` (503 busy, 413 too large) and ``retry_after`` seconds say why."""

    def __init__(self, message: str, *, status: int, retry_after: int | None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass
class Ticket:
    """What one admitted request holds: a concurrency slot and ``pixels`` of the budget."""

    pixels: int
    started: float


class Admission:
    """Counts running requests and their decoded pixels; admits or refuses without waiting.

    Thread-safe (the event loop admits, worker threads may release), never blocks: a refusal is immediate, so a
    refused request never holds memory while it waits.
    """

    def __init__(self, *, max_concurrency: int, max_pixels: int, pixel_budget: int | None = None) -> None:
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_pixels < 1:
            raise ConfigError(f"max_pixels must be >= 1, got {max_pixels}")
        budget = max_pixels if pixel_budget is None else pixel_budget
        if budget < max_pixels:
            raise ConfigError(
                f"pixel_budget ({budget}) must be >= max_pixels ({max_pixels}): a maximal image must fit alone"
            )
        self.max_concurrency = max_concurrency
        self.max_pixels = max_pixels
        self.pixel_budget = budget
        self._lock = threading.Lock()
        self._running = 0
        self._pixels = 0
        self._mean_seconds = 1.0  # exponential mean of service times, for Retry-After

    @property
    def running(self) -> int:
        return self._running

    @property
    def pixels_in_use(self) -> int:
        return self._pixels

    def retry_after(self) -> int:
        return max(1, math.ceil(self._mean_seconds))

    def admit(self, pixels: int) -> Ticket:
        """A ticket for a request that will decode ``pixels`` pixels (0 for a request without an upload).

        Raises:
            AdmissionRefused: 413 when ``pixels`` exceeds ``max_pixels``; 503 (with ``retry_after``) when the
                concurrency or the pixel budget is spent right now.
        """
        if pixels > self.max_pixels:
            raise AdmissionRefused(
                f"image of {pixels} pixels is larger than the limit of {self.max_pixels} pixels",
                status=413,
                retry_after=None,
            )
        with self._lock:
            if self._running >= self.max_concurrency:
                reason = f"{self._running} searches are running (the limit is {self.max_concurrency})"
            elif self._pixels + pixels > self.pixel_budget:
                reason = (
                    f"images being processed hold {self._pixels} of {self.pixel_budget} decoded pixels; this "
                    f"one needs {pixels}"
                )
            else:
                self._running += 1
                self._pixels += pixels
                return Ticket(pixels=pixels, started=time.perf_counter())
        raise AdmissionRefused(
            f"the server is busy: {reason}; try again in a moment", status=503, retry_after=self.retry_after()
        )

    def release(self, ticket: Ticket) -> None:
        elapsed = time.perf_counter() - ticket.started
        with self._lock:
            self._running -= 1
            self._pixels -= ticket.pixels
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * elapsed


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def allowed_hosts_for(bound: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The host names a server bound to ``bound`` answers to (lower case, IPv6 without brackets); None = any.

    Loopback binding: every loopback alias (``localhost``, ``127.0.0.1``, ``::1``) and ``bound`` itself. A
    wildcard (``0.0.0.0``, ``::``): the loopback aliases, this machine's host names and their addresses. Any other
    address or name: itself. ``extra`` adds names (a reverse proxy's public name); ``"*"`` turns the check off.
    """
    names = {_normalise(h) for h in extra}
    if "*" in names:
        return None
    bound = _normalise(bound)
    names.add(bound)
    if _is_loopback(bound) or _is_wildcard(bound):
        names.update(_LOOPBACK_NAMES)
    if _is_wildcard(bound):
        for name in {socket.gethostname(), socket.getfqdn()}:
            names.add(name.lower())
            try:
                names.update(_normalise(str(info[4][0])) for info in socket.getaddrinfo(name, None))
            except OSError:
                pass
    return frozenset(n for n in names if n)


def _normalise(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def split_host_header(value: str) -> str | None:
    """The host part of a ``Host`` header (``name``, ``name:port``, ``[v6]:port``), or None when malformed."""
    value = value.strip()
    if not value or any(c.isspace() or c in "/\\@?#" for c in value):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
    else:
        host, _, port = value.partition(":")
        rest = f":{port}" if port else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6):
        return None
    return _normalise(host) or None


class HostCheck:
    """ASGI middleware: answer 400 to a request without a well-formed ``Host`` and 421 to one naming a host this
    server does not serve (see :func:`allowed_hosts_for`)."""

    def __init__(self, app: ASGIApp, *, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        raw = [v for k, v in scope.get("headers", []) if k == b"host"]
        host = split_host_header(raw[0].decode("latin-1")) if len(raw) == 1 else None
        if host is None:
            await _reply(send, 400, "missing or malformed Host header")
            return
        if host not in self.allowed:
            await _reply(
                send,
                421,
                f"this server does not answer to host {host!r}; start it with --allowed-host {host} to allow it",
            )
            return
        await self.app(scope, receive, send)


async def _reply(send: Send, status: int, message: str) -> None:
    import json

    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
