"""From a photo to a ranked shop list: ``capret.RetrievalPipeline``.

The stages (DESIGN.md, "The query path at inference") — each optional, swappable and timed::

    detect  -> caption -> embed -> search -> rerank
    detector   Captioner  RetrievalModel  Gallery index  reranker

Stable API (``capret serve`` and other front ends build on exactly this)::

    pipeline = RetrievalPipeline.load("qs/pipeline")            # a pipeline folder (below)
    matches = pipeline.search("street.jpg", k=20)              # list[Match], best first
    pipeline.last_timings                                      # {"detect": ms, ..., "total": ms} of that call
    result = pipeline.search_detailed(image, k=20, use_captions=False, rerank=False, boxes=[[x1, y1, x2, y2]])
    result.matches, result.timings, result.items               # items: the query items (box, score, caption)
    pipeline.search_by_id("000012/0", k=20)                    # "more like this gallery item"
    pipeline.save("other_folder")                              # writes pipeline.json (paths kept resolvable)

``image`` is a file path or a PIL image. ``use_captions`` (default: the pipeline's) turns the caption stage off
for one call (the image-only path of the dual-stream model); ``rerank`` does the same for the reranker; ``boxes``
bypasses the detector. Each detected item of the photo is searched; the lists are merged by best score per gallery
item, and every :class:`Match` says which query item (``query_box``, ``query_caption``) found it. A photo in
which the detector finds nothing is searched as a whole image (``SearchResult.fallback`` says so).

**Pipeline folder**: ``pipeline.json`` (:class:`PipelineConfig`) names the model folder and the gallery folder
(``capret index build``; relative paths are relative to the pipeline folder), the detector (registry name +
options; ``null`` = whole image), the captioner (:class:`~capret.inference.query.captioner.CaptionerSettings`; ``null``
= image-only) and the reranker (registry name + options + how many head results it reorders; ``null`` = none).
The reranker sees the shortlist only (its candidates' features and images), so its memory does not grow with the
gallery.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np
from PIL import Image

from capret.data.imagefile import decode_image
from capret.errors import ConfigError, DataError
from capret.inference.detectors import Detection, WholeImageDetector, create_detector, run_detector
from capret.inference.query.captioner import Captioner, CaptionerSettings, image_digest
from capret.inference.query.gallery import Gallery
from capret.io import atomic_write_json, read_json

__all__ = [
    "PIPELINE_FILE",
    "STAGES",
    "Match",
    "PipelineConfig",
    "QueryItem",
    "RetrievalPipeline",
    "SearchResult",
]

PIPELINE_FILE = "pipeline.json"
PIPELINE_VERSION = 1
#: timed stages, in order ("total" is end to end)
STAGES = ("detect", "caption", "embed", "search", "rerank")
#: detector options holding paths, resolved against the pipeline folder when relative
_PATH_OPTIONS = ("path", "checkpoint", "images_file")


@dataclass
class PipelineConfig:
    """The content of ``pipeline.json``."""

    model: str = "model"  # model folder (capret.load_model), relative to the pipeline folder or absolute
    gallery: str = "gallery"  # gallery folder written by `capret index build`
    detector: dict[str, Any] | None = None  # {"name": ..., "options": {...}}; None = whole image
    captioner: dict[str, Any] | None = None  # CaptionerSettings as a dict; None = image-only search
    reranker: dict[str, Any] | None = (
        None  # {"name": ..., "options": {...}, "topk": 100}; None = no reranking
    )
    use_captions: bool = True  # default of search(use_captions=...)
    max_items: int = 5  # most query items (detections) searched per photo

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, path: Path | None = None) -> PipelineConfig:
        """Check and build: a known format and version, known keys, and each value of its type and range (a
        ``max_items`` of -1 or ``"two"`` is refused naming the key, never turned into a silent empty search)."""
        if not isinstance(data, dict):
            raise DataError(f"a pipeline file holds a JSON object, not {type(data).__name__}", path=path)
        if data.get("format", "capret-pipeline") != "capret-pipeline":
            raise DataError(f"format {data.get('format')!r} is not 'capret-pipeline'", path=path)
        version = data.get("version", PIPELINE_VERSION)
        if type(version) is not int or not 1 <= version <= PIPELINE_VERSION:
            raise DataError(
                f"unknown version {version!r}; this capret reads pipeline version 1 to {PIPELINE_VERSION}",
                path=path,
            )
        data = {k: v for k, v in data.items() if k not in ("format", "version")}
        valid = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - valid)
        if unknown:
            raise DataError(f"unknown pipeline key(s) {unknown}; valid: {sorted(valid)}", path=path)
        config = cls(**data)
        config.check(path=path)
        return config

    def check(self, *, path: Path | None = None) -> None:
        """Raise :class:`~capret.errors.DataError` naming the first key whose value has the wrong type or range."""

        def bad(key: str, value: Any, valid: str) -> DataError:
            return DataError(f"{key}: {value!r} is not valid; expected {valid}", path=path)

        for key in ("model", "gallery"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise bad(key, value, "a folder path (text)")
        if type(self.max_items) is not int or self.max_items < 1:
            raise bad("max_items", self.max_items, "a whole number >= 1")
        if type(self.use_captions) is not bool:
            raise bad("use_captions", self.use_captions, "true or false")
        for key in ("detector", "captioner", "reranker"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, dict):
                raise bad(key, value, "an object or null")
        for key in ("detector", "reranker"):
            value = getattr(self, key)
            if value is not None:
                if not isinstance(value.get("name"), str):
                    raise bad(f"{key}.name", value.get("name"), "a registered name (text)")
                if not isinstance(value.get("options", {}), dict):
                    raise bad(f"{key}.options", value.get("options"), "an object")
        if self.reranker is not None:
            topk = self.reranker.get("topk", 100)
            if type(topk) is not int or topk < 1:
                raise bad("reranker.topk", topk, "a whole number >= 1")

    def to_dict(self) -> dict[str, Any]:
        return {"format": "capret-pipeline", "version": PIPELINE_VERSION, **asdict(self)}

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/pipeline.json`` (how a pipeline folder is made without loading anything)."""
        self.check()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return atomic_write_json(directory / PIPELINE_FILE, self.to_dict(), indent=2)


@dataclass
class QueryItem:
    """One item of the query photo: its box, the detector's score/category, and its caption (None = none)."""

    box: list[float]
    score: float
    category_id: int | None
    caption: str | None


@dataclass
class Match:
    """One gallery item of the ranked list."""

    rank: int  # 1-based position in the list
    gallery_id: str  # "<gallery image id>/<item n>"
    score: float  # similarity (after reranking, the reranker's score)
    image: str  # path of the gallery photo
    box: list[float] | None  # the gallery item's box in that photo
    gallery_caption: str | None  # the gallery item's caption (when the gallery was captioned)
    query_box: list[float]  # which query item found it
    query_caption: str | None  # that query item's caption

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SearchOptions(TypedDict, total=False):
    """The keyword options of :meth:`Pipeline.search` (those of :meth:`Pipeline.search_detailed`)."""

    boxes: Sequence[Sequence[float]] | None  # item boxes [x1, y1, x2, y2] instead of the detector's
    use_captions: bool | None  # caption the query (None = the pipeline's setting)
    rerank: bool | None  # rerank the head (None = whenever a reranker is configured)


@dataclass
class SearchResult:
    """Everything one search produced: the list, the query items, per-stage milliseconds."""

    matches: list[Match]
    items: list[QueryItem]
    timings: dict[str, float] = field(default_factory=dict)  # stage -> milliseconds, and "total"
    fallback: bool = False  # the detector found nothing: the whole image was searched
    caption_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "matches": [m.to_dict() for m in self.matches],
            "items": [asdict(i) for i in self.items],
            "timings_ms": self.timings,
            "fallback": self.fallback,
            "caption_errors": self.caption_errors,
        }


def _resolve(base: Path | None, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() or base is None else base / path


class RetrievalPipeline:
    """detector -> captioner -> model -> gallery index -> reranker; see the module docstring."""

    def __init__(
        self,
        *,
        model: Any,
        gallery: Gallery,
        detector: Any = None,
        captioner: Captioner | None = None,
        reranker: Any = None,
        rerank_topk: int = 100,
        use_captions: bool = True,
        max_items: int = 5,
        config: PipelineConfig | None = None,
    ) -> None:
        if model is not None and model.embed_dim != gallery.dim:
            raise DataError(
                f"model embeds {model.embed_dim}-d features, gallery holds {gallery.dim}-d; index the gallery with "
                "this model",
                path=gallery.directory,
            )
        self.model = model
        self.gallery = gallery
        self.detector = detector
        self.captioner = captioner
        self.reranker = reranker
        self.rerank_topk = int(rerank_topk)
        self.use_captions = bool(use_captions)
        self.max_items = int(max_items)
        self.config = config or PipelineConfig()
        self.directory: Path | None = None
        self.last_timings: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------- folders

    @classmethod
    def load(
        cls, directory: str | Path, *, device: str | None = None, verify: bool = True
    ) -> RetrievalPipeline:
        """Open a pipeline folder (``pipeline.json`` and what it names); ``verify=False`` skips the gallery's
        checksum verification (see :class:`~capret.inference.query.gallery.Gallery`)."""
        directory = Path(directory)
        path = directory / PIPELINE_FILE
        if not path.is_file():
            raise DataError(f"not a pipeline folder (no {PIPELINE_FILE})", path=directory)
        data = read_json(path, what="pipeline file")  # names the file: syntax, duplicate keys, NaN
        pipeline = cls.from_config(
            PipelineConfig.from_dict(data, path=path), base_dir=directory, device=device, verify=verify
        )
        pipeline.directory = directory
        return pipeline

    @classmethod
    def from_config(
        cls,
        config: PipelineConfig,
        *,
        base_dir: Path | None = None,
        device: str | None = None,
        verify: bool = True,
    ) -> RetrievalPipeline:
        from capret.inference.dualstream.encoding import load_model
        from capret.retrieval.rerank import create_reranker

        model = load_model(_resolve(base_dir, config.model), device=device)
        gallery = Gallery(_resolve(base_dir, config.gallery), device=device, verify=verify)
        detector = None
        if config.detector:
            options = dict(config.detector.get("options", {}))
            for key in _PATH_OPTIONS:
                if isinstance(options.get(key), str):
                    options[key] = str(_resolve(base_dir, options[key]))
            detector = create_detector(config.detector["name"], **options)
        captioner = None
        if config.captioner:
            captioner = Captioner.from_settings(
                CaptionerSettings.from_dict(config.captioner), base_dir=base_dir
            )
        reranker, topk = None, 100
        if config.reranker:
            reranker = create_reranker(config.reranker["name"], **config.reranker.get("options", {}))
            topk = int(config.reranker.get("topk", 100))
        return cls(
            model=model,
            gallery=gallery,
            detector=detector,
            captioner=captioner,
            reranker=reranker,
            rerank_topk=topk,
            use_captions=config.use_captions,
            max_items=config.max_items,
            config=config,
        )

    def save(self, directory: str | Path) -> Path:
        """Write ``pipeline.json`` into ``directory``; relative model/gallery paths are rewritten to stay valid."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.config.to_dict()
        if self.directory is not None and self.directory.resolve() != directory.resolve():
            for key in ("model", "gallery"):
                data[key] = str(_resolve(self.directory, data[key]).resolve())
        atomic_write_json(directory / PIPELINE_FILE, data, indent=2)
        return directory / PIPELINE_FILE

    def close(self) -> None:
        if self.captioner is not None:
            self.captioner.close()

    # ----------------------------------------------------------------------------------------- search

    def search(
        self, image: str | Path | Image.Image, k: int = 20, **options: Unpack[SearchOptions]
    ) -> list[Match]:
        """The ranked list for a photo (options as :meth:`search_detailed`); timings in :attr:`last_timings`."""
        result = self.search_detailed(image, k, **options)
        return result.matches

    def search_detailed(
        self,
        image: str | Path | Image.Image,
        k: int = 20,
        *,
        boxes: Sequence[Sequence[float]] | None = None,
        use_captions: bool | None = None,
        rerank: bool | None = None,
    ) -> SearchResult:
        """Run every stage for one photo; see the module docstring for the options."""
        if self.model is None:
            raise ConfigError("this pipeline has no model: it can only search by gallery id")
        if int(k) < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        timings = dict.fromkeys(STAGES, 0.0)
        start = time.perf_counter()
        path = Path(image) if isinstance(image, str | Path) else None
        picture = _open(image)

        t = time.perf_counter()
        fallback = False
        if boxes is not None:
            dets = [Detection(box=_box(b, picture)) for b in boxes]
        else:
            dets = run_detector(self.detector or WholeImageDetector(), [picture], [path])[0]
            dets = sorted(dets, key=lambda d: -d.score)[: self.max_items]
            if not dets:
                fallback = True
                dets = WholeImageDetector().detect([picture])[0]
        timings["detect"] = _ms(t)

        t = time.perf_counter()
        captions: list[str | None] = [None] * len(dets)
        errors: list[str] = []
        caption_on = self.use_captions if use_captions is None else bool(use_captions)
        if caption_on and self.captioner is not None:
            digest = image_digest(picture)
            captions = self.captioner.caption(
                [picture] * len(dets),
                [d.box for d in dets],
                category_ids=[d.category_id for d in dets],
                digests=[digest] * len(dets),
            )
            errors = list(self.captioner.last_errors)
        timings["caption"] = _ms(t)

        t = time.perf_counter()
        queries = self.model.encode_images(
            [picture] * len(dets),
            captions if caption_on and self.captioner is not None else None,
            boxes=[d.box for d in dets],
            num_workers=0,
        )
        timings["embed"] = _ms(t)

        rerank_on = self.reranker is not None and (rerank is None or bool(rerank))
        depth = max(int(k), self.rerank_topk) if rerank_on else int(k)
        t = time.perf_counter()
        scores, rows = self.gallery.search(queries, depth)
        timings["search"] = _ms(t)

        if rerank_on:
            t = time.perf_counter()
            scores, rows = self._rerank(queries, scores, rows, picture=picture, path=path, dets=dets)
            timings["rerank"] = _ms(t)

        items = [
            QueryItem(box=list(d.box), score=float(d.score), category_id=d.category_id, caption=c)
            for d, c in zip(dets, captions)
        ]
        matches = self._merge(scores, rows, items, k=int(k))
        timings["total"] = _ms(start)
        self.last_timings = timings
        return SearchResult(
            matches=matches, items=items, timings=timings, fallback=fallback, caption_errors=errors
        )

    def search_by_id(self, gallery_id: str, k: int = 20, *, rerank: bool | None = None) -> list[Match]:
        """Gallery items most similar to gallery item ``gallery_id`` (itself excluded), from its stored feature."""
        start = time.perf_counter()
        row = self.gallery.row_of(gallery_id)
        item = self.gallery.items[row]
        query = self.gallery.features.gather([row])
        rerank_on = self.reranker is not None and (rerank is None or bool(rerank))
        depth = (max(int(k), self.rerank_topk) if rerank_on else int(k)) + 1
        t = time.perf_counter()
        scores, rows = self.gallery.search(query, depth)
        keep = rows[0] != row
        scores, rows = scores[:, keep], rows[:, keep]
        timings = dict.fromkeys(STAGES, 0.0)
        timings["search"] = _ms(t)
        box = item.get("box")
        if rerank_on:
            t = time.perf_counter()
            det = Detection(box=tuple(box) if box else (0.0, 0.0, 0.0, 0.0))
            scores, rows = self._rerank(
                query, scores, rows, picture=None, path=Path(item["image"]), dets=[det]
            )
            timings["rerank"] = _ms(t)
        own = QueryItem(
            box=list(box or []), score=1.0, category_id=item.get("category_id"), caption=item.get("caption")
        )
        matches = self._merge(scores, rows, [own], k=int(k))
        timings["total"] = _ms(start)
        self.last_timings = timings
        return matches

    # ----------------------------------------------------------------------------------------- helpers

    def _rerank(
        self,
        queries: np.ndarray,
        scores: np.ndarray,
        rows: np.ndarray,
        *,
        picture: Image.Image | None,
        path: Path | None,
        dets: Sequence[Detection],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rerank each query item's shortlist; the reranker sees only the candidates (positions 0..K-1)."""
        out_scores, out_rows = scores.copy(), rows.copy()
        with tempfile.TemporaryDirectory(prefix="capret-query-") as tmp:
            query_path = path
            if query_path is None and picture is not None:  # geometric verification reads files
                query_path = Path(tmp) / "query.png"
                picture.save(query_path)
            for q in range(rows.shape[0]):
                valid = rows[q] >= 0
                cand = rows[q][valid]
                if cand.size < 2:
                    continue
                records = [self.gallery.items[int(r)] for r in cand]
                new_rank, new_scores = self.reranker.rerank(
                    ranking=np.arange(cand.size, dtype=np.int64)[None],
                    scores=scores[q][valid][None],
                    query_features=queries[q : q + 1],
                    gallery_features=self.gallery.features.gather(cand),
                    query_images=[(str(query_path), list(dets[q].box))],
                    gallery_images=[(str(r["image"]), r.get("box")) for r in records],
                )
                out_rows[q, : cand.size] = cand[new_rank[0]]
                out_scores[q, : cand.size] = new_scores[0]
        return out_scores, out_rows

    def _merge(
        self, scores: np.ndarray, rows: np.ndarray, items: Sequence[QueryItem], *, k: int
    ) -> list[Match]:
        """One list over all query items: each gallery row keeps its best score (ties: the earlier item)."""
        best: dict[int, tuple[float, int]] = {}
        for q in range(rows.shape[0]):
            for score, row in zip(scores[q], rows[q]):
                if row < 0 or not np.isfinite(score):
                    continue
                if int(row) not in best or float(score) > best[int(row)][0]:
                    best[int(row)] = (float(score), q)
        ordered = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))[:k]
        matches = []
        for position, (row, (score, q)) in enumerate(ordered, start=1):
            record = self.gallery.items[row]
            matches.append(
                Match(
                    rank=position,
                    gallery_id=str(record["id"]),
                    score=score,
                    image=str(record.get("image", "")),
                    box=record.get("box"),
                    gallery_caption=record.get("caption"),
                    query_box=list(items[q].box),
                    query_caption=items[q].caption,
                )
            )
        return matches


def _open(image: str | Path | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    return decode_image(image)  # MissingImageError / BadImageError naming the file


def _box(values: Sequence[float], picture: Image.Image) -> tuple[float, float, float, float]:
    if len(values) != 4:
        raise ConfigError(f"a box is [x1, y1, x2, y2], got {list(values)}")
    x1, y1, x2, y2 = (float(v) for v in values)
    if not (x2 > x1 and y2 > y1):
        raise ConfigError(f"box {list(values)} is empty (need x2 > x1 and y2 > y1)")
    if x1 >= picture.width or y1 >= picture.height or x2 <= 0 or y2 <= 0:
        raise ConfigError(f"box {list(values)} lies outside the {picture.width}x{picture.height} image")
    return (x1, y1, x2, y2)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)
