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

Safe by default: uploads over ``max_upload_bytes`` get 413 (checked from ``Content-Length`` before reading and
again while reading); an upload that PIL cannot decode, or that exceeds ``max_pixels``, gets 415; gallery items
are addressed by id only (a file path never comes from a client); at most ``max_concurrency`` searches run at a
time and a request that cannot start within ``queue_seconds`` gets 503; errors answer with a short JSON message and
never a traceback (it goes to the server log).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import warnings
from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from capret.serve.backends import Box, ServeBackend, crop_box

__all__ = ["create_app"]

logger = logging.getLogger("capret.serve")

#: gallery ids look like "<image id>/<item n>": letters, digits, "_", "-", "." and single "/" separators
_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*$")
_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


def _asset(name: str) -> str:
    return resources.files("capret.serve").joinpath("static", name).read_text(encoding="utf-8")


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


def create_app(
    backend: ServeBackend,
    *,
    max_upload_bytes: int = 8 * 1024 * 1024,
    max_pixels: int = 40_000_000,
    max_concurrency: int = 2,
    queue_seconds: float = 10.0,
    max_k: int = 100,
) -> FastAPI:
    """The ASGI app over ``backend`` (see the module docstring for the routes and the limits)."""
    app = FastAPI(
        title="capret serve",
        description="Caption-augmented image retrieval and composed queries over a shop gallery.",
        version="1",
        docs_url=None,  # FastAPI's own docs page loads its scripts from a CDN; /docs below works offline
        redoc_url=None,
    )
    gate = asyncio.Semaphore(max_concurrency)

    async def limited(fn: Callable[[], Any]) -> Any:
        try:
            await asyncio.wait_for(gate.acquire(), timeout=queue_seconds)
        except TimeoutError:
            raise HTTPException(503, "the server is busy; try again in a moment") from None
        try:
            return await run_in_threadpool(fn)
        finally:
            gate.release()

    async def read_upload(request: Request, upload: UploadFile) -> Image.Image:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes + 64 * 1024:
            raise HTTPException(413, f"upload larger than {max_upload_bytes} bytes")
        data = await upload.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_bytes} bytes")
        if not data:
            raise HTTPException(415, "the upload is empty, not an image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                picture = Image.open(io.BytesIO(data))
                if picture.width * picture.height > max_pixels:
                    raise HTTPException(415, f"image larger than {max_pixels} pixels")
                picture.load()
        except HTTPException:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, Warning):
            raise HTTPException(415, "the upload is not a decodable image (JPEG, PNG, WebP, ...)") from None
        return picture.convert("RGB")

    def entry_or_404(gallery_id: str) -> Any:
        try:
            return backend.entry(_check_id(gallery_id))
        except KeyError:
            raise HTTPException(404, f"no gallery item {gallery_id!r}") from None

    def check_k(k: int) -> int:
        if not 1 <= k <= max_k:
            raise HTTPException(422, f"k must be between 1 and {max_k}")
        return k

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("error while serving %s", request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    # ------------------------------------------------------------------------------------------ page
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_asset("index.html"))

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in _ASSETS:
            raise HTTPException(404, "no such asset")
        return Response(_asset(name), media_type=_ASSETS[name])

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(_asset("docs.html"))

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

        return Response(await limited(render), media_type="image/jpeg")

    async def reference(
        request: Request, image: UploadFile | None, gallery_id: str | None
    ) -> tuple[Image.Image, Box | None, str]:
        """The query picture: an upload, or a gallery item (its photo and box) by id; exactly one."""
        if (image is None) == (gallery_id is None or gallery_id == ""):
            raise HTTPException(422, "give exactly one of an uploaded image or a gallery item id")
        if image is not None:
            return await read_upload(request, image), None, "upload"
        entry = entry_or_404(str(gallery_id))
        picture = await limited(lambda: backend.gallery_image(entry.id, crop=False))
        return picture, entry.box, entry.id

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
        picture, box, source = await reference(request, image, gallery_id)
        boxes = None if box is None else [box]
        result: dict[str, Any] = await limited(
            lambda: backend.image_search(picture, k=k, use_captions=use_captions, rerank=rerank, boxes=boxes)
        )
        first = result["items"][0]["box"] if result["items"] else None
        return {"source": source, "query_crop": _thumbnail(picture, first), **result}

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
        picture, box, source = await reference(request, image, reference_id)
        result: dict[str, Any] = await limited(
            lambda: backend.composed_search(picture, box, text, k=k, method=method)
        )
        return {"source": source, "reference_crop": _thumbnail(picture, box), **result}

    return app


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run ``app`` with uvicorn (blocking) on ``host:port``."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
