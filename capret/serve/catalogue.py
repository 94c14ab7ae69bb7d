"""``capret serve --catalogue DIR``: a page and JSON API over a living catalogue (:mod:`capret.catalogue`).

Routes:

- ``GET /`` the page (photo upload, category filter, results); ``GET /static/{catalogue.js,style.css}``;
- ``GET /api/info`` rows, photos, model fingerprint, index kind, whether writes are enabled;
- ``GET /api/categories`` rows per category (the page's filter);
- ``GET /api/item/image?id=&crop=`` an item's photo or crop as JPEG (items are addressed by id only);
- ``POST /api/search`` (multipart: ``image``, ``k``, ``category``, ``text``, ``use_captions``) the ranked items;
- with ``allow_writes`` only, and only with ``Authorization: Bearer <token>``: ``POST /api/items`` (multipart:
  ``image``, ``category``) adds a photo (saved under ``<root>/uploads/<sha256 prefix>.<format>``, then the
  catalogue's ``add``: duplicates skipped, near duplicates reported); ``POST /api/items/remove`` (form ``id``,
  repeatable) removes items. Without ``allow_writes`` the write routes do not exist (404).

Limits are those of the pipeline server (:mod:`capret.serve.admission`): admission from the image header before
decoding (503 with ``Retry-After`` when busy, 413 when too large), the Host header checked against the bound
address. Every search first looks at the catalogue's latest version, so rows another process adds are found
without a restart. A write while another process writes the catalogue answers 409 naming the holder.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Unpack

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from capret.catalogue.table import SourceChangedError
from capret.errors import UsageError
from capret.serve import web
from capret.serve.backends import crop_box

__all__ = ["CatalogueBackend", "create_catalogue_app"]

_ID = re.compile(r"^[\w.-]+(/[\w.-]+)*$")
_ASSETS = {"catalogue.js": "text/javascript", "style.css": "text/css"}


class CatalogueBackend:
    """A catalogue opened for serving: its searcher (stages loaded once) and the write operations."""

    def __init__(self, catalogue: Any, *, device: str | None = None, verify: bool = True) -> None:
        from capret.catalogue import CatalogueSearcher

        self.catalogue = catalogue
        self.device = device
        self.verify = verify  # item photos checked against their rows' SHA-256 before they are served
        self.searcher = CatalogueSearcher(catalogue, device=device)

    @classmethod
    def open(
        cls,
        location: str,
        *,
        storage_options: dict[str, str] | None = None,
        root: str | None = None,
        device: str | None = None,
        verify: bool = True,
    ) -> CatalogueBackend:
        from capret.catalogue import Catalogue

        catalogue = Catalogue.open(location, storage_options=storage_options, root=root)
        return cls(catalogue, device=device, verify=verify)

    def info(self) -> dict[str, Any]:
        self.catalogue.refresh()
        settings = self.catalogue.settings
        return {
            "catalogue": self.catalogue.location,
            "rows": len(self.catalogue),
            "dim": settings.dim,
            "fingerprint": settings.fingerprint,
            "index": "ivf_pq" if self.catalogue.has_vector_index() else "exact",
            "captioner": (settings.captioner or {}).get("backend"),
        }

    def categories(self) -> dict[str, int]:
        self.catalogue.refresh()
        return self.catalogue.categories()

    def item_image(self, item: str, *, crop: bool) -> Image.Image:
        self.catalogue.refresh()
        rows = self.catalogue.rows([item], columns=["id", "image", "image_sha256", "box"])
        if not rows:
            raise KeyError(item)
        path = self.catalogue.verified_source(rows[0], verify=self.verify)
        with Image.open(path) as opened:
            picture = opened.convert("RGB")
        return crop_box(picture, rows[0]["box"]) if crop else picture

    def search(
        self, picture: Image.Image, *, k: int, category: str | None, text: str | None, use_captions: bool
    ) -> dict[str, Any]:
        self.catalogue.refresh()
        captioner = self.searcher.stages.captioner
        if not use_captions:
            self.searcher.stages.captioner = None
        try:
            return self.searcher.search(picture, k=k, category=category, text=text)
        finally:
            self.searcher.stages.captioner = captioner

    def add(self, data: bytes, picture: Image.Image, *, category: str | None) -> dict[str, Any]:
        """Save an uploaded photo under ``<root>/uploads`` (named by its SHA-256) and add it."""
        from capret.catalogue import add_images

        digest = hashlib.sha256(data).hexdigest()
        suffix = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}.get(str(picture.format), ".png")
        target = Path(self.catalogue.settings.root) / "uploads" / f"{digest[:32]}{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            from capret.io import atomic_write_bytes

            atomic_write_bytes(target, data)
        return add_images(self.catalogue, [target], categories=[category])

    def remove(self, ids: Sequence[str]) -> dict[str, Any]:
        with self.catalogue.writing():
            removed = self.catalogue.remove(ids=list(ids))
        return {"removed_rows": removed, "rows": len(self.catalogue)}

    def close(self) -> None:
        self.searcher.close()


def create_catalogue_app(
    backend: CatalogueBackend,
    *,
    allow_writes: bool = False,
    token: str | None = None,
    **limits: Unpack[web.ServeLimits],
) -> FastAPI:
    """The ASGI app over a catalogue (see the module docstring); writes need ``allow_writes`` and a token."""
    if allow_writes and not token:
        raise UsageError("write endpoints need a token: pass --token (or set CAPRET_SERVE_TOKEN)")
    app, full, admitted = web.limited_app(limits, title="capret serve (catalogue)")
    max_upload_bytes, max_pixels, max_k = full["max_upload_bytes"], full["max_pixels"], full["max_k"]
    writer = asyncio.Lock()

    def probe(request: Request, upload: UploadFile) -> tuple[Image.Image, int, bytes]:
        """The upload's bytes and its header-opened image (no pixel decoded yet) with its size in pixels."""
        web.check_upload_size(request, None, max_upload_bytes=max_upload_bytes)
        data = upload.file.read(max_upload_bytes + 1)
        web.check_upload_size(request, len(data), max_upload_bytes=max_upload_bytes)
        picture = web.open_upload_header(io.BytesIO(data), max_pixels=max_pixels)
        return picture, picture.width * picture.height, data

    def check_id(value: str) -> str:
        if len(value) > 300 or not _ID.match(value) or ".." in value:
            raise HTTPException(400, "item ids are letters, digits, '_', '-', '.' and '/' separators")
        return value

    def authorise(request: Request) -> None:
        given = request.headers.get("authorization", "")
        expected = f"Bearer {token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(401, "write endpoints need 'Authorization: Bearer <token>'")

    page = web.render_page(
        title="capret — catalogue search",
        heading="capret catalogue",
        panels="catalogue-panels.html",
        script="catalogue.js",
    )
    web.add_page_routes(app, page=page, assets=_ASSETS)

    @app.get("/api/info", summary="What is served")
    async def info() -> dict[str, Any]:
        found: dict[str, Any] = await run_in_threadpool(backend.info)
        return {**found, "writes": allow_writes, "max_k": max_k, "max_upload_bytes": max_upload_bytes}

    @app.get("/api/categories", summary="Rows per category")
    async def categories() -> dict[str, int]:
        counts: dict[str, int] = await run_in_threadpool(backend.categories)
        return counts

    @app.get("/api/item/image", summary="An item's photo or crop as JPEG")
    async def item_image(id: str = Query(..., description="item id"), crop: bool = True) -> Response:
        item = check_id(id)

        def render() -> bytes:
            picture = backend.item_image(item, crop=crop)
            picture.thumbnail((512, 512))
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=88)
            return buffer.getvalue()

        async with admitted(0):
            try:
                return Response(await run_in_threadpool(render), media_type="image/jpeg")
            except KeyError:
                raise HTTPException(404, f"no item {item!r}") from None
            except SourceChangedError:
                raise HTTPException(
                    409,
                    f"the photo of item {item!r} changed since it was added (SHA-256 differs); not served",
                ) from None
            except OSError:
                raise HTTPException(404, f"the photo of item {item!r} cannot be read") from None

    @app.post("/api/search", summary="Photo (+ optional text) to ranked items, optionally in one category")
    async def search(
        request: Request,
        image: UploadFile = File(..., description="query photo"),
        k: int = Form(12),
        category: str | None = Form(None, max_length=100),
        text: str | None = Form(None, max_length=500),
        use_captions: bool = Form(True),
    ) -> dict[str, Any]:
        if not 1 <= k <= max_k:
            raise HTTPException(422, f"k must be between 1 and {max_k}")
        picture, pixels, _ = probe(request, image)
        async with admitted(pixels):
            decoded = web.decode_upload(picture)
            result: dict[str, Any] = await run_in_threadpool(
                lambda: backend.search(
                    decoded, k=k, category=category or None, text=text or None, use_captions=use_captions
                )
            )
        return result

    if not allow_writes:
        return app

    @app.post("/api/items", summary="Add a photo (token required)")
    async def add_item(
        request: Request,
        image: UploadFile = File(..., description="photo to add"),
        category: str | None = Form(None, max_length=100),
    ) -> dict[str, Any]:
        authorise(request)
        picture, pixels, data = probe(request, image)
        async with admitted(pixels), writer:
            web.decode_upload(picture)
            return await run_in_threadpool(
                lambda: _locked(lambda: backend.add(data, picture, category=category))
            )

    @app.post("/api/items/remove", summary="Remove items by id (token required)")
    async def remove_items(request: Request, id: list[str] = Form(...)) -> dict[str, Any]:
        authorise(request)
        ids = [check_id(i) for i in id]
        async with admitted(0), writer:
            return await run_in_threadpool(lambda: _locked(lambda: backend.remove(ids)))

    return app


def _locked(fn: Any) -> Any:
    """Run a write; another process holding the catalogue's writer lock answers 409 naming it."""
    from capret.locks import OutputLockedError

    try:
        return fn()
    except OutputLockedError as exc:
        raise HTTPException(409, str(exc)) from None
