"""What the two web apps (``capret serve`` over a gallery and over a catalogue) share: their static assets and
catch-all error page, the host check, admission around a search, and the safe opening of an uploaded image.

Both apps promise the same limits (see :mod:`capret.serve.app`): an upload is refused from its declared and its
received size before anything is decoded, its pixel count is read from the header only, and the pixels are decoded
once the search holds its admission. Keeping those steps in one place keeps the two apps' answers (413/415/503)
identical.
"""

from __future__ import annotations

import contextlib
import html
import logging
import string
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from importlib import resources
from typing import IO, TypedDict

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError

from capret.errors import UnknownNameError
from capret.serve.admission import Admission, AdmissionRefused, HostCheck, allowed_hosts_for

__all__ = [
    "DEFAULT_LIMITS",
    "ServeLimits",
    "add_page_routes",
    "admission_scope",
    "check_host",
    "check_upload_size",
    "decode_upload",
    "limited_app",
    "open_upload_header",
    "read_asset",
    "render_page",
]

logger = logging.getLogger("capret.serve")

_NOT_AN_IMAGE = "the upload is not a decodable image (JPEG, PNG, WebP, ...)"


def read_asset(name: str) -> str:
    """A file of ``capret/serve/static`` (served from the package, no CDN)."""
    return resources.files("capret.serve").joinpath("static", name).read_text(encoding="utf-8")


def check_host(app: FastAPI, *, host: str | None, allowed_hosts: Sequence[str]) -> None:
    """Answer 421 to requests whose ``Host`` names another host than the bound one (DNS rebinding); None skips."""
    if host is not None:
        allowed = allowed_hosts_for(host, allowed_hosts)
        if allowed is not None:
            app.add_middleware(HostCheck, allowed=allowed)


class ServeLimits(TypedDict, total=False):
    """The limits both apps take as keywords (what they guard is in :mod:`capret.serve.app`); one left out takes
    its value from :data:`DEFAULT_LIMITS`.

    ``pixel_budget`` (default ``max_pixels``: one maximal image decoded at a time) bounds the decoded pixels of all
    running searches together. ``host`` is the address the server is bound to: requests must name it (or, on
    loopback, any loopback alias) or one of ``allowed_hosts`` in their ``Host`` header; None skips the check (an
    app embedded behind another server that checks hosts itself).
    """

    max_upload_bytes: int
    max_pixels: int
    pixel_budget: int | None
    max_concurrency: int
    max_k: int
    host: str | None
    allowed_hosts: Sequence[str]


DEFAULT_LIMITS: ServeLimits = {
    "max_upload_bytes": 8 * 1024 * 1024,
    "max_pixels": 40_000_000,
    "pixel_budget": None,
    "max_concurrency": 2,
    "max_k": 100,
    "host": None,
    "allowed_hosts": (),
}

Admitted = Callable[[int], AbstractAsyncContextManager[None]]


def limited_app(
    limits: ServeLimits, *, title: str, description: str = ""
) -> tuple[FastAPI, ServeLimits, Admitted]:
    """A FastAPI app under ``limits`` (defaults filled in, also returned): the Host check, the admission (kept as
    ``app.state.admission``) and ``admitted`` (:func:`admission_scope`) for its searches. FastAPI's own docs pages
    are off: they load their scripts from a CDN."""
    unknown = sorted(set(limits) - set(DEFAULT_LIMITS))
    if (
        unknown
    ):  # keywords are checked statically too; this catches a typo at run time as the old signature did
        raise UnknownNameError(f"unknown serve limit {unknown[0]!r}; valid: {', '.join(DEFAULT_LIMITS)}")
    full: ServeLimits = {**DEFAULT_LIMITS, **limits}
    admission = Admission(
        max_concurrency=full["max_concurrency"],
        max_pixels=full["max_pixels"],
        pixel_budget=full["pixel_budget"],
    )
    app = FastAPI(title=title, description=description, version="1", docs_url=None, redoc_url=None)
    check_host(app, host=full["host"], allowed_hosts=full["allowed_hosts"])
    app.state.admission = admission
    return app, full, admission_scope(admission)


def admission_scope(admission: Admission) -> Admitted:
    """``async with admitted(pixels)``: hold a concurrency slot and ``pixels`` of the budget, or answer 503/413."""

    @contextlib.asynccontextmanager
    async def admitted(pixels: int) -> AsyncIterator[None]:
        try:
            ticket = admission.admit(pixels)
        except AdmissionRefused as exc:
            headers = None if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
            raise HTTPException(exc.status, str(exc), headers=headers) from None
        try:
            yield
        finally:
            admission.release(ticket)

    return admitted


def check_upload_size(request: Request, size: int | None, *, max_upload_bytes: int) -> None:
    """413 for an upload over the limit, from its ``Content-Length`` (``size`` None: only that is known yet)
    or from its received ``size``; 415 for an empty one."""
    if size is None:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes + 64 * 1024:
            raise HTTPException(413, f"upload larger than {max_upload_bytes} bytes")
        return
    if size > max_upload_bytes:
        raise HTTPException(413, f"upload larger than {max_upload_bytes} bytes")
    if size == 0:
        raise HTTPException(415, "the upload is empty, not an image")


def open_upload_header(handle: IO[bytes], *, max_pixels: int) -> Image.Image:
    """The upload opened lazily: its header is read (so its pixel count is known), no pixel is decoded yet."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            return Image.open(handle)
    except Image.DecompressionBombError:
        raise HTTPException(413, f"image larger than {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise HTTPException(415, _NOT_AN_IMAGE) from None


def decode_upload(picture: Image.Image) -> Image.Image:
    """Decode an admitted upload (its size was checked from the header) as RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture.load()
            return picture if picture.mode == "RGB" else picture.convert("RGB")  # no second copy
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, Warning):
        raise HTTPException(415, _NOT_AN_IMAGE) from None


def render_page(*, title: str, heading: str, panels: str, script: str, nav: str | None = None) -> str:
    """A page of the apps: the shared frame (``page.html``: head and style sheet, the header with the heading and
    the ``#info`` line each script fills from ``/api/info``, the main area, the script tag) around the ``panels``
    asset and the optional ``nav`` asset, so the two apps' pages differ only in what they show."""
    frame = string.Template(read_asset("page.html"))
    return frame.substitute(
        title=html.escape(title),
        heading=html.escape(heading),
        nav=read_asset(nav) if nav else "",
        panels=read_asset(panels),
        script=script,
    )


def add_page_routes(app: FastAPI, *, page: str, assets: dict[str, str]) -> None:
    """``GET /`` the ``page`` (HTML, see :func:`render_page`), ``GET /static/{name}`` one of ``assets`` (name ->
    media type), and a 500 answer without a traceback for any unhandled error (the traceback goes to the server
    log)."""

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("error while serving %s", request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404, "no such asset")
        return Response(read_asset(name), media_type=assets[name])
