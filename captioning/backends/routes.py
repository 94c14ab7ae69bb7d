"""Where a request to an OpenAI-compatible server really goes, and keeping its API key off plain-text hops.

The key rule used to look only at the base URL: ``http://127.0.0.1:8000/v1`` is loopback, so the key was
allowed -- but with ``HTTP_PROXY`` set, httpx sent that request, ``Authorization`` header included, in plain text
to the proxy, which may sit anywhere on the network. So the rule now looks at the route:

1. :func:`route_for` decides, from the environment exactly as curl/urllib/httpx read it (``http_proxy``,
   ``https_proxy``, ``all_proxy`` in either case, ``NO_PROXY`` bypasses), whether a base URL is reached directly
   or through a proxy, and which;
2. :func:`check_key_route` allows a key only when no hop carries it in plain text to another machine: a
   plain-http request must go to a loopback server, and through a proxy only when that proxy is loopback or
   spoken to over https (an https request is tunnelled end to end, so any proxy is fine);
3. the backend then builds its HTTP client *with that route* (an explicit transport, so httpx does not apply
   its own environment proxies again), so the route that was checked is the route that is used.

:func:`redact` removes the key from any text that may be stored or printed (failure records, error messages):
a server that echoes the request back in an error body must not put the key into a failures file.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from capret.errors import ConfigError

__all__ = ["REDACTED", "Route", "check_key_route", "is_loopback", "redact", "route_for"]

REDACTED = "[REDACTED]"


def is_loopback(host: str) -> bool:
    """``localhost`` (and ``*.localhost``, RFC 6761) or a loopback IP address."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Route:
    """How a request to ``url`` travels: directly, or through ``proxy`` (a URL, from the environment)."""

    url: str
    proxy: str | None

    def describe(self) -> str:
        return (
            f"{self.url} (direct)" if self.proxy is None else f"{self.url} via proxy {_safe_url(self.proxy)}"
        )


def _safe_url(url: str) -> str:
    """``url`` without credentials (a proxy URL may carry ``user:password@``)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def route_for(url: str, *, environ: Mapping[str, str] | None = None) -> Route:
    """The route to ``url`` given proxy variables in ``environ`` (default: ``os.environ``).

    Follows the conventions httpx (and urllib, curl) use: lower-case variables win over upper-case ones, the
    scheme's own proxy wins over ``all_proxy``, ``no_proxy`` lists hosts (suffixes, ``*`` for all) reached
    directly, and a proxy without a scheme is an http proxy.
    """
    env = os.environ if environ is None else environ
    proxies = _proxies(env)
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy:
        return Route(url=url, proxy=None)
    if "no" in proxies and urllib.request.proxy_bypass_environment(host, proxies):  # type: ignore[attr-defined]
        return Route(url=url, proxy=None)
    return Route(url=url, proxy=proxy if "://" in proxy else f"http://{proxy}")


def _proxies(env: Mapping[str, str]) -> dict[str, str]:
    """``{scheme: proxy}`` from ``*_proxy`` variables, read as ``urllib.request.getproxies_environment`` (which
    httpx uses) reads them: names ending in lower-case ``_proxy`` win, an empty one removes the scheme, and in a
    CGI process (``REQUEST_METHOD`` set) upper-case ``HTTP_PROXY`` is ignored (it could come from the client)."""
    found: dict[str, str] = {}
    for name, value in env.items():
        lowered = name.lower()
        if value and lowered[-6:] == "_proxy":
            found[lowered[:-6]] = value
    if "REQUEST_METHOD" in env:
        found.pop("http", None)
    for name, value in env.items():
        if name[-6:] == "_proxy":
            lowered = name.lower()
            if value:
                found[lowered[:-6]] = value
            else:
                found.pop(lowered[:-6], None)
    return found


def check_key_route(routes: Iterable[Route]) -> None:
    """Refuse a route on which an API key would travel in plain text to another machine.

    Raises:
        ConfigError: naming the base URL, the proxy and what to change.
    """
    for route in routes:
        target = urlsplit(route.url)
        if target.scheme == "https":
            continue  # TLS end to end (through a proxy: a CONNECT tunnel), whatever the proxy
        if not is_loopback(target.hostname or ""):
            raise ConfigError(
                f"--base-url {route.url}: refusing to send an API key over plain http to a non-loopback host "
                "(anyone on the network could read it); use https, or unset the key for this server"
            )
        if route.proxy is None:
            continue
        proxy = urlsplit(route.proxy)
        if proxy.scheme.lower() == "https" or is_loopback(proxy.hostname or ""):
            continue
        raise ConfigError(
            f"--base-url {route.url}: the environment sends it through the proxy {_safe_url(route.proxy)} "
            "(HTTP_PROXY/ALL_PROXY), which would receive the API key over plain http; add the host to NO_PROXY "
            "(e.g. NO_PROXY=localhost,127.0.0.1,::1), use an https proxy or https, or unset the key"
        )


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every occurrence of each secret replaced by ``[REDACTED]`` (also JSON-escaped forms)."""
    for secret in secrets:
        if not secret:
            continue
        for form in {secret, secret.encode("unicode_escape").decode("ascii")}:
            text = text.replace(form, REDACTED)
    return text
