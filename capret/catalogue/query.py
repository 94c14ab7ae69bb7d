"""Searching a catalogue with a photo: the query path of the pipeline over the catalogue's rows.

The photo goes through the catalogue's own stages (detector, captioner, model: the same that embedded the rows),
or a box given by the user, or a text given by the user in the caption's place; each query item is searched
(prefiltered by category when asked), and the lists are merged by best score per row, as
:class:`~capret.inference.query.pipeline.RetrievalPipeline` merges its items. An optional reranker
(:mod:`capret.retrieval.rerank`) reorders each item's shortlist from the rows' stored vectors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from capret.catalogue.stages import ImageJob, ItemStages
from capret.catalogue.table import Catalogue
from capret.data.imagefile import decode_image

__all__ = ["CatalogueSearcher"]


class CatalogueSearcher:
    """A catalogue with its stages loaded once, for repeated searches (the CLI makes one, the server keeps one)."""

    def __init__(self, catalogue: Catalogue, *, device: str | None = None, captions: bool = True) -> None:
        self.catalogue = catalogue
        # query captions stay in memory: the catalogue's caption store belongs to its writer
        self.stages = ItemStages(catalogue.settings, caption_cache=None, device=device)
        if not captions:
            self.stages.captioner = None

    def close(self) -> None:
        self.stages.close()

    def search(
        self,
        photo: str | Path | Image.Image,
        *,
        k: int = 10,
        box: Sequence[float] | None = None,
        text: str | None = None,
        category: str | None = None,
        rerank: str | None = None,
        rerank_topk: int = 50,
    ) -> dict[str, Any]:
        """Ranked rows for ``photo`` (see the module docstring); with the query items and per-stage ms."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        picture = photo.convert("RGB") if isinstance(photo, Image.Image) else decode_image(photo)
        job = ImageJob(
            path=str(photo) if not isinstance(photo, Image.Image) else "",
            relative="query",
            sha256="",
            phash=0,
            box=None if box is None else tuple(float(v) for v in box),  # type: ignore[arg-type]
            caption=text,
        )
        t = time.perf_counter()
        dets = self.stages.detect([picture], [job])[0]
        timings["detect"] = _ms(t)
        t = time.perf_counter()
        captions, _ = self.stages.captions([picture], [job], [0] * len(dets), dets)
        timings["caption"] = _ms(t)
        t = time.perf_counter()
        queries = self.stages.model.encode_images(
            [picture] * len(dets),
            captions if any(c is not None for c in captions) else None,
            boxes=[list(d.box) for d in dets],
            num_workers=0,
        )
        timings["embed"] = _ms(t)
        t = time.perf_counter()
        depth = max(int(k), int(rerank_topk)) if rerank else int(k)
        lists = self.catalogue.search(
            np.asarray(queries, np.float32), depth, category=category, with_vectors=rerank is not None
        )
        timings["search"] = _ms(t)
        if rerank:
            t = time.perf_counter()
            lists = [_rerank(rerank, q, hits) for q, hits in zip(np.asarray(queries), lists)]
            timings["rerank"] = _ms(t)
        best: dict[str, tuple[float, int, dict[str, Any]]] = {}
        for q, hits in enumerate(lists):
            for hit in hits:
                hit.pop("vector", None)
                if hit["id"] not in best or hit["score"] > best[hit["id"]][0]:
                    best[hit["id"]] = (hit["score"], q, hit)
        ordered = sorted(best.values(), key=lambda v: (-v[0], v[2]["id"]))[: int(k)]
        results = []
        for rank, (score, q, hit) in enumerate(ordered, start=1):
            results.append(
                {
                    "rank": rank,
                    "id": hit["id"],
                    "score": round(float(score), 6),
                    "image": hit["image"],
                    "box": [float(v) for v in hit["box"]],
                    "category": hit["category"],
                    "caption": hit["caption"],
                    "query_item": q,
                }
            )
        timings["total"] = _ms(start)
        items = [{"box": list(d.box), "score": d.score, "caption": c} for d, c in zip(dets, captions)]
        return {"items": items, "results": results, "category": category, "timings_ms": timings}


def _rerank(name: str, query: np.ndarray, hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reorder one shortlist with reranker ``name`` from the stored vectors (feature rerankers only)."""
    from capret.retrieval.rerank import create_reranker

    if len(hits) < 2:
        return hits
    reranker = create_reranker(name)
    features = np.asarray([h["vector"] for h in hits], dtype=np.float32)
    order, scores = reranker.rerank(
        ranking=np.arange(len(hits), dtype=np.int64)[None],
        scores=np.asarray([[h["score"] for h in hits]], dtype=np.float32),
        query_features=query[None].astype(np.float32),
        gallery_features=features,
    )
    out = []
    for position, score in zip(np.asarray(order)[0].tolist(), np.asarray(scores)[0].tolist()):
        out.append({**hits[int(position)], "score": float(score)})
    return out


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)
