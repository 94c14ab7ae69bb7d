"""What ``capret serve`` searches with: one image-to-image backend and optional composed-query backends.

The web app (:mod:`capret.serve.app`) talks only to :class:`ServeBackend`, which wraps a
:class:`~capret.inference.query.pipeline.RetrievalPipeline` (detector -> captioner -> dual-stream model -> gallery index
-> reranker) and a list of :class:`ComposedMethod` objects. Every gallery item is addressed by its id; the file
path behind an id is looked up here and never comes from a client.

Composed methods:

- ``dual-stream`` (always there): the reference item's crop fused with the modification text by the trained
  dual-stream model (the text takes the caption's place), searched in the same gallery. It needs no extra weights,
  so it works on the quickstart's artefacts; it was not trained for composed queries, so treat it as a baseline.
- ``combiner``: a CLIP4Cir Combiner checkpoint (``capret-train`` task ``combiner``); the gallery crops are encoded
  with its CLIP once, at start-up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from capret.data.geometry import Box
from capret.errors import ConfigError, DataError

__all__ = [
    "CombinerMethod",
    "ComposedMethod",
    "DualStreamComposed",
    "crop_box",
    "GalleryEntry",
    "ServeBackend",
]


@dataclass(frozen=True)
class GalleryEntry:
    """One gallery item: its id, the photo it is in (server side only), its box and caption."""

    id: str
    image: Path
    box: Box | None
    caption: str | None

    def public(self) -> dict[str, Any]:
        """What a client may see (no file path)."""
        return {"id": self.id, "box": list(self.box) if self.box else None, "caption": self.caption}


class ComposedMethod(Protocol):
    """A composed-query method: ``(reference crop, modification text) -> (scores, gallery rows)``."""

    name: str

    def search(
        self, reference: Image.Image, box: Box | None, text: str, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(scores, rows)`` over the gallery, best first (rows index the pipeline's gallery)."""
        ...


def crop_box(picture: Image.Image, box: Any) -> Image.Image:
    """``picture`` in RGB, cropped to ``box`` (x1, y1, x2, y2 in pixels) when one is given."""
    rgb = picture.convert("RGB")
    if not box:
        return rgb
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return rgb.crop((x1, y1, x2, y2))


class DualStreamComposed:
    """Reference crop + modification text through the dual-stream model, searched in the pipeline's gallery."""

    name = "dual-stream"

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def search(
        self, reference: Image.Image, box: Box | None, text: str, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        boxes = None if box is None else [list(box)]
        query = self.pipeline.model.encode_images([reference], [text], boxes=boxes, num_workers=0)
        scores, rows = self.pipeline.gallery.search(np.asarray(query, dtype=np.float32), k)
        return scores[0], rows[0]


class CombinerMethod:
    """A CLIP4Cir Combiner checkpoint over CLIP features of the gallery crops (encoded once, at start-up)."""

    name = "combiner"

    def __init__(
        self, checkpoint: str | Path, entries: Sequence[GalleryEntry], *, device: str | None = None
    ) -> None:
        from capret.inference.cir.combiner import load_cir_model
        from capret.io import default_device

        self.device = default_device(device)
        self.clip, self.fuser, _ = load_cir_model(Path(checkpoint), device=self.device)
        with torch.inference_mode():
            feats = [self._image_features(crop_box(Image.open(e.image), e.box)) for e in entries]
        gallery = torch.cat(feats) if feats else torch.zeros(0, self.clip.feature_dim)
        self.gallery = torch.nn.functional.normalize(gallery.float(), dim=-1)

    def _image_features(self, picture: Image.Image) -> torch.Tensor:
        pixels = self.clip.transform(picture).unsqueeze(0).to(self.device)
        return self.clip.image_features(pixels).float().cpu()

    def search(
        self, reference: Image.Image, box: Box | None, text: str, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        from capret.inference.cir.search import compose_queries

        with torch.inference_mode():
            image = self._image_features(crop_box(reference, box))
            tokens = self.clip.tokenize([text])
            words = self.clip.text_features(**{n: v.to(self.device) for n, v in tokens.items()}).float().cpu()
            query = compose_queries(self.fuser, images=image, texts=words, device=self.device)
        scores = (query @ self.gallery.T)[0]
        top = torch.topk(scores, min(int(k), scores.numel()))
        return top.values.numpy(), top.indices.numpy()


class ServeBackend:
    """The pipeline and composed methods behind the web app, with the gallery addressable by id only."""

    def __init__(self, pipeline: Any, *, composed: Sequence[ComposedMethod] = ()) -> None:
        self.pipeline = pipeline
        base = Path(pipeline.gallery.directory)
        self.entries: list[GalleryEntry] = []
        for item in pipeline.gallery.items:
            image = Path(str(item["image"]))
            image = image if image.is_absolute() else base / image
            box = item.get("box")
            self.entries.append(
                GalleryEntry(
                    id=str(item["id"]),
                    image=image,
                    box=tuple(float(v) for v in box) if box else None,  # type: ignore[arg-type]
                    caption=item.get("caption"),
                )
            )
        self.by_id = {e.id: e for e in self.entries}
        self.composed: dict[str, ComposedMethod] = {"dual-stream": DualStreamComposed(pipeline)}
        for method in composed:
            self.composed[method.name] = method

    @classmethod
    def from_pipeline_dir(
        cls, directory: str | Path, *, combiner: str | Path | None = None, device: str | None = None
    ) -> ServeBackend:
        from capret.inference.query.pipeline import RetrievalPipeline

        pipeline = RetrievalPipeline.load(directory, device=device)
        backend = cls(pipeline)
        if combiner is not None:
            method = CombinerMethod(combiner, backend.entries, device=device)
            backend.composed[method.name] = method
        return backend

    # ------------------------------------------------------------------------------------------ gallery
    def entry(self, gallery_id: str) -> GalleryEntry:
        """The gallery item ``gallery_id``; unknown ids raise ``KeyError`` (the app answers 404)."""
        if gallery_id not in self.by_id:
            raise KeyError(gallery_id)
        return self.by_id[gallery_id]

    def gallery_image(self, gallery_id: str, *, crop: bool) -> Image.Image:
        entry = self.entry(gallery_id)
        try:
            with Image.open(entry.image) as opened:
                picture = opened.convert("RGB")
        except OSError as exc:
            raise DataError(f"gallery image cannot be read ({exc})", path=entry.image) from None
        return crop_box(picture, entry.box) if crop else picture

    def info(self) -> dict[str, Any]:
        pipeline = self.pipeline
        return {
            "gallery_size": len(self.entries),
            "captioner": None if pipeline.captioner is None else pipeline.captioner.name,
            "detector": None if pipeline.detector is None else type(pipeline.detector).__name__,
            "reranker": None if pipeline.reranker is None else (pipeline.config.reranker or {}).get("name"),
            "composed_methods": sorted(self.composed),
        }

    # ------------------------------------------------------------------------------------------ search
    def _matches(self, scores: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for score, row in zip(scores.tolist(), rows.tolist()):
            if row < 0:
                continue
            entry = self.entries[int(row)]
            out.append({"rank": len(out) + 1, "score": float(score), **entry.public()})
        return out

    def image_search(
        self,
        picture: Image.Image,
        *,
        k: int,
        use_captions: bool,
        rerank: bool,
        boxes: Sequence[Box] | None = None,
    ) -> dict[str, Any]:
        """The pipeline's search for one photo: query items (box, caption), per-stage ms, the ranked list."""
        result = self.pipeline.search_detailed(
            picture,
            k,
            use_captions=use_captions,
            rerank=rerank,
            boxes=None if boxes is None else [list(b) for b in boxes],
        )
        results = [
            {
                "rank": m.rank,
                "score": float(m.score),
                **self.entry(m.gallery_id).public(),
                "query_box": m.query_box,
            }
            for m in result.matches
        ]
        return {
            "items": [
                {"box": i.box, "score": i.score, "category_id": i.category_id, "caption": i.caption}
                for i in result.items
            ],
            "timings_ms": {name: round(float(v), 2) for name, v in result.timings.items()},
            "fallback": result.fallback,
            "caption_errors": list(result.caption_errors),
            "use_captions": use_captions,
            "rerank": rerank and self.pipeline.reranker is not None,
            "results": results,
        }

    def composed_search(
        self, reference: Image.Image, box: Box | None, text: str, *, k: int, method: str
    ) -> dict[str, Any]:
        if method not in self.composed:
            raise ConfigError(
                f"unknown composed method {method!r}; loaded: {', '.join(sorted(self.composed))}"
            )
        start = time.perf_counter()
        scores, rows = self.composed[method].search(reference, box, text, k)
        return {
            "method": method,
            "text": text,
            "timings_ms": {"total": round((time.perf_counter() - start) * 1000, 2)},
            "results": self._matches(np.asarray(scores), np.asarray(rows)),
        }
