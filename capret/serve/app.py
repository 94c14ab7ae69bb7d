"""The ``capret serve`` web app: a page for people and the JSON API it is a client of.

Routes (OpenAPI schema at ``/openapi.json``, a readable offline rendering of it at ``/docs``):

- ``GET /`` the page; ``GET /static/{app.js,style.css}`` its assets (served from the package, no CDN);
- ``GET /api/info`` what is loaded (gallery size, captioner, detector, reranker, composed methods);
- ``GET /api/gallery?offset=&limit=`` gallery items (id, box, caption); ``GET /api/gallery/image?id=&crop=``
  one gallery photo or item crop as JPEG;
- ``POST /api/search/image`` (multipart: ``image`` upload *or* ``gallery_id``; ``k``, ``use_captions``,
  ``rerank``) the photo's items, their captions, per-stage milliseconds and the ranked shop items;
- ``POST /api/search/composed`` (multipart: ``image`` upload *or* ``reference_id``; ``text``, ``k``,
  ``method``) the ranked list for reference + modification text.

Safe by default: uploads over ``max_upload_bytes`` get 413 (checked from ``Content-Length`` and from the
received size); an upload that PIL cannot read gets 415; an image larger than ``max_pixels`` (from its header)
gets 413. Memory is bounded before decoding (:mod:`capret.serve.admission`): every search is admitted from the
image header against ``max_concurrency`` running searches and a ``pixel_budget`` of decoded pixels in total, or
answered 503 at once with ``Retry-After``; it keeps its admission until its answer is computed. With ``host``
given, a request whose ``Host`` header names another host gets 421 (DNS rebinding). Gallery items are
addressed by id only (a file path never comes from a client); errors answer with a short JSON message and never
a traceback (it goes to the server log).
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
from collections.abc import AsyncIterator
from typing import Any, Unpack

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from capret.serve import web
from capret.serve.admission import Admission
from capret.serve.backends import Box, ServeBackend, crop_box

__all__ = ["create_app"]


#: gallery ids look like "<image id>/<item n>": letters, digits, "_", "-", "." and single "/" separators
_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*$")
_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


def _check_id(value: str) -> str:
    if len(value) > 200 or not _ID.match(value) or ".." in value:
        raise HTTPException(400, "gallery ids are letters, digits, '_', '-', '.' and '/' separators")
    return value


def _thumbnail(picture: Image.Image, box: Any, *, side: int = 224) -> str:
    """A data URL of the (cropped) picture, for showing the query item the server actually searched."""
    crop = crop_box(picture, box)
    crop.thumbnail((side, side))
    buffer = io.BytesIO()
    crop.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def create_app(backend: ServeBackend, **limits: Unpack[web.ServeLimits]) -> FastAPI:
    """The ASGI app over ``backend`` (see the module docstring for the routes, :class:`~capret.serve.web.ServeLimits` for the
    limits)."""
    app, full, admitted = web.limited_app(
        limits,
        title="capret serve",
        description="Caption-augmented image retrieval and composed queries over a shop gallery.",
    )
    admission: Admission = app.state.admission
    max_upload_bytes, max_pixels, max_k = full["max_upload_bytes"], full["max_pixels"], full["max_k"]

    def probe_upload(request: Request, upload: UploadFile) -> tuple[Image.Image, int]:
        """The upload opened lazily (header only: no pixel decoded yet) and its decoded size in pixels."""
        web.check_upload_size(request, None, max_upload_bytes=max_upload_bytes)
        handle = upload.file
        handle.seek(0, io.SEEK_END)
        size = handle.tell()
        handle.seek(0)
        web.check_upload_size(request, size, max_upload_bytes=max_upload_bytes)
        picture = web.open_upload_header(handle, max_pixels=max_pixels)
        return picture, picture.width * picture.height

    def gallery_pixels(entry: Any) -> int:
        """The decoded size of a gallery photo from its header (the operator's file: never refused as too large,
        it counts at most the whole budget)."""
        try:
            with Image.open(entry.image) as opened:
                return min(opened.width * opened.height, admission.pixel_budget)
        except (OSError, ValueError):
            return 0  # the backend reports the unreadable file itself

    def entry_or_404(gallery_id: str) -> Any:
        try:
            return backend.entry(_check_id(gallery_id))
        except KeyError:
            raise HTTPException(404, f"no gallery item {gallery_id!r}") from None

    def check_k(k: int) -> int:
        if not 1 <= k <= max_k:
            raise HTTPException(422, f"k must be between 1 and {max_k}")
        return k

    # ------------------------------------------------------------------------------------------ page
    page = web.render_page(
        title="capret — caption-augmented retrieval",
        heading="capret",
        nav="index-nav.html",
        panels="index-panels.html",
        script="app.js",
    )
    web.add_page_routes(app, page=page, assets=_ASSETS)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(web.read_asset("docs.html"))

    # ------------------------------------------------------------------------------------------ API
    @app.get("/api/info", summary="What is loaded")
    async def info() -> dict[str, Any]:
        return {**backend.info(), "max_upload_bytes": max_upload_bytes, "max_k": max_k}

    @app.get("/api/gallery", summary="Gallery items (id, box, caption)")
    async def gallery(offset: int = Query(0, ge=0), limit: int = Query(60, ge=1, le=500)) -> dict[str, Any]:
        items = backend.entries[offset : offset + limit]
        return {"total": len(backend.entries), "offset": offset, "items": [e.public() for e in items]}

    @app.get("/api/gallery/image", summary="A gallery photo, or the item's crop, as JPEG")
    async def gallery_image(
        id: str = Query(..., description="gallery item id"), crop: bool = True
    ) -> Response:
        entry = entry_or_404(id)

        def render() -> bytes:
            picture = backend.gallery_image(entry.id, crop=crop)
            picture.thumbnail((512, 512))
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=88)
            return buffer.getvalue()

        async with admitted(gallery_pixels(entry)):
            return Response(await run_in_threadpool(render), media_type="image/jpeg")

    @contextlib.asynccontextmanager
    async def query_picture(
        request: Request, image: UploadFile | None, gallery_id: str | None
    ) -> AsyncIterator[tuple[Image.Image, Box | None, str]]:
        """The admitted, decoded query picture: an upload, or a gallery item (its photo and box) by id.

        Admission comes first, from the header; the pixels are decoded only once admitted, and the admission
        is held until the caller's block (the search) ends.
        """
        if (image is None) == (gallery_id is None or gallery_id == ""):
            raise HTTPException(422, "give exactly one of an uploaded image or a gallery item id")
        if image is not None:
            header, pixels = probe_upload(request, image)
            async with admitted(pixels):
                yield await run_in_threadpool(web.decode_upload, header), None, "upload"
            return
        entry = entry_or_404(str(gallery_id))
        async with admitted(gallery_pixels(entry)):
            picture = await run_in_threadpool(lambda: backend.gallery_image(entry.id, crop=False))
            yield picture, entry.box, entry.id

    @app.post("/api/search/image", summary="Image to image: items, captions, timings, ranked shop items")
    async def search_image(
        request: Request,
        image: UploadFile | None = File(None, description="query photo"),
        gallery_id: str | None = Form(None, description="or: a gallery item id to use as the query"),
        k: int = Form(12),
        use_captions: bool = Form(True),
        rerank: bool = Form(False),
    ) -> dict[str, Any]:
        k = check_k(k)
        async with query_picture(request, image, gallery_id) as (picture, box, source):
            boxes = None if box is None else [box]

            def run() -> dict[str, Any]:
                found = backend.image_search(
                    picture, k=k, use_captions=use_captions, rerank=rerank, boxes=boxes
                )
                first = found["items"][0]["box"] if found["items"] else None
                return {"source": source, "query_crop": _thumbnail(picture, first), **found}

            result: dict[str, Any] = await run_in_threadpool(run)
        return result

    @app.post("/api/search/composed", summary="Composed query: reference image + modification text")
    async def search_composed(
        request: Request,
        text: str = Form(..., min_length=1, max_length=500, description="how the target should differ"),
        image: UploadFile | None = File(None, description="reference photo"),
        reference_id: str | None = Form(None, description="or: a gallery item id as the reference"),
        k: int = Form(12),
        method: str = Form("dual-stream"),
    ) -> dict[str, Any]:
        k = check_k(k)
        if method not in backend.composed:
            raise HTTPException(
                422, f"unknown method {method!r}; loaded: {', '.join(sorted(backend.composed))}"
            )
        async with query_picture(request, image, reference_id) as (picture, box, source):

            def run() -> dict[str, Any]:
                found = backend.composed_search(picture, box, text, k=k, method=method)
                return {"source": source, "reference_crop": _thumbnail(picture, box), **found}

            result: dict[str, Any] = await run_in_threadpool(run)
        return result

    return app


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run ``app`` with uvicorn (blocking) on ``host:port``."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
