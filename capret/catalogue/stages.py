"""The model stages of a catalogue: detect -> caption -> embed, turning photos into rows.

These are the stages of the query pipeline (:mod:`capret.inference.query.pipeline`), built from the catalogue's
settings: the registered detector (``None`` = the whole photo), the :class:`~capret.inference.query.captioner.
Captioner` (template, a local VLM/LLM, or an OpenAI-compatible server; its caption store caches every caption,
so a rerun never asks twice), and the dual-stream :class:`~capret.inference.dualstream.encoding.RetrievalModel`.
The local engine calls :meth:`ItemStages.rows` in the writer's process; the Ray engine builds one
:class:`ItemStages` per actor from the same settings, so both produce the same rows.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from capret.catalogue.schema import CatalogueSettings, item_id, row_schema
from capret.data.deepfashion2 import CATEGORIES
from capret.data.imagefile import decode_image
from capret.errors import CheckpointError
from capret.inference.detectors import Detection, WholeImageDetector, create_detector, run_detector
from capret.inference.query.captioner import Captioner, CaptionerSettings, image_digest

__all__ = ["ImageJob", "ItemStages", "utc_now"]


@dataclass(frozen=True)
class ImageJob:
    """One photo to add: where it is, its hashes (computed by the planner), an optional category and box."""

    path: str  # absolute local path of the source photo
    relative: str  # path relative to the catalogue root (POSIX)
    sha256: str
    phash: int
    category: str | None = None  # given by the user (a shop knows its categories); else the detector's
    box: tuple[float, float, float, float] | None = None  # one item with this box, bypassing the detector
    caption: str | None = None  # a caption given by the user ("manual"), bypassing the captioner

    def to_dict(self) -> dict[str, Any]:
        """Every field, for ``json.dumps`` (the box tuple is written as a JSON list); :meth:`from_dict` reverses it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageJob:
        box = data.get("box")
        return cls(
            path=str(data["path"]),
            relative=str(data["relative"]),
            sha256=str(data["sha256"]),
            phash=int(data["phash"]),
            category=data.get("category"),
            box=None if box is None else tuple(float(v) for v in box),  # type: ignore[arg-type]
            caption=data.get("caption"),
        )


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class ItemStages:
    """Detector, captioner and model of one catalogue (see the module docstring)."""

    def __init__(
        self,
        settings: CatalogueSettings,
        *,
        caption_cache: str | Path | None = None,
        device: str | None = None,
        model: Any = None,
    ) -> None:
        from capret.catalogue.schema import model_fingerprint
        from capret.inference.dualstream.encoding import load_model

        self.settings = settings
        if model is None:
            fingerprint = model_fingerprint(settings.model)
            if fingerprint != settings.fingerprint:
                raise CheckpointError(
                    f"the catalogue's rows were embedded by model fingerprint {settings.fingerprint}, but "
                    f"{settings.model} now has fingerprint {fingerprint}; re-embed every row with "
                    "`capret catalogue update DIR --reembed --model M`",
                    path=settings.model,
                )
            model = load_model(settings.model, device=device)
        if model.embed_dim != settings.dim:
            raise CheckpointError(
                f"model embeds {model.embed_dim}-d rows, the catalogue holds {settings.dim}-d",
                path=settings.model,
            )
        self.model = model
        self.detector: Any = None
        if settings.detector:
            self.detector = create_detector(settings.detector["name"], **settings.detector.get("options", {}))
        self.captioner: Captioner | None = None
        if settings.captioner:
            captioner = dict(settings.captioner)
            captioner["cache"] = None if caption_cache is None else str(caption_cache)
            self.captioner = Captioner.from_settings(CaptionerSettings.from_dict(captioner))
        self.schema = row_schema(settings.dim)

    @property
    def caption_source(self) -> str:
        return "none" if self.captioner is None else self.captioner.name

    def close(self) -> None:
        if self.captioner is not None:
            self.captioner.close()

    def detect(self, pictures: Sequence[Image.Image], jobs: Sequence[ImageJob]) -> list[list[Detection]]:
        """Items per photo, best first; a photo where the detector finds nothing is one whole-image item (so
        every added photo has a row, and a rerun knows it is done)."""
        found: list[list[Detection] | None] = [None] * len(jobs)
        todo = [i for i, job in enumerate(jobs) if job.box is None]
        for i, job in enumerate(jobs):
            if job.box is not None:
                found[i] = [Detection(box=job.box)]
        if todo:
            detector = self.detector or WholeImageDetector()
            dets = run_detector(detector, [pictures[i] for i in todo], [jobs[i].path for i in todo])
            for i, found_items in zip(todo, dets):
                found[i] = sorted(found_items, key=lambda d: -d.score)[: self.settings.max_items]
        out: list[list[Detection]] = []
        for i, kept in enumerate(found):
            out.append(kept or WholeImageDetector().detect([pictures[i]])[0])
        return out

    def rows(self, jobs: Sequence[ImageJob], *, now: _dt.datetime | None = None) -> pa.Table:
        """Every item row of ``jobs`` (detect -> caption -> embed), as one Arrow table of the row schema."""
        pictures = [decode_image(job.path) for job in jobs]
        detections = self.detect(pictures, jobs)
        owners: list[int] = []
        dets: list[Detection] = []
        for j, items in enumerate(detections):
            owners.extend([j] * len(items))
            dets.extend(items)
        captions, sources = self.captions(pictures, jobs, owners, dets)
        vectors = self.model.encode_images(
            [pictures[o] for o in owners],
            captions if any(c is not None for c in captions) else None,
            boxes=[list(d.box) for d in dets],
            num_workers=0,
        )
        return self.table(jobs, owners, dets, captions, sources, vectors, now=now)

    def captions(
        self,
        pictures: Sequence[Image.Image],
        jobs: Sequence[ImageJob],
        owners: Sequence[int],
        dets: Sequence[Detection],
    ) -> tuple[list[str | None], list[str]]:
        """Caption of every item and who wrote it (a job's own caption wins; failures go image-only)."""
        captions: list[str | None] = [jobs[o].caption for o in owners]
        sources = ["manual" if c is not None else "none" for c in captions]
        todo = [i for i, c in enumerate(captions) if c is None]
        if self.captioner is not None and todo:
            digests = {o: image_digest(pictures[o]) for o in {owners[i] for i in todo}}
            made = self.captioner.caption(
                [pictures[owners[i]] for i in todo],
                [dets[i].box for i in todo],
                category_ids=[dets[i].category_id for i in todo],
                digests=[digests[owners[i]] for i in todo],
            )
            for i, caption in zip(todo, made):
                captions[i] = caption
                sources[i] = self.captioner.name if caption is not None else "none"
        return captions, sources

    def embed(
        self,
        sources: Sequence[str | Path],
        *,
        boxes: Sequence[Sequence[float]],
        captions: Sequence[str | None],
    ) -> np.ndarray:
        """Embeddings of stored items (re-embedding keeps their boxes and captions)."""
        pictures = [decode_image(path) for path in sources]
        return np.asarray(
            self.model.encode_images(
                pictures,
                list(captions) if any(c is not None for c in captions) else None,
                boxes=[list(b) for b in boxes],
                num_workers=0,
            ),
            dtype=np.float32,
        )

    def table(
        self,
        jobs: Sequence[ImageJob],
        owners: Sequence[int],
        dets: Sequence[Detection],
        captions: Sequence[str | None],
        sources: Sequence[str],
        vectors: np.ndarray,
        *,
        now: _dt.datetime | None = None,
    ) -> pa.Table:
        """Assemble rows in the schema (the item number counts a photo's items in detection order)."""
        stamp = now or utc_now()
        counter: dict[int, int] = {}
        columns: dict[str, list[Any]] = {name: [] for name in self.schema.names}
        for owner, det, caption, source in zip(owners, dets, captions, sources):
            job = jobs[owner]
            n = counter.get(owner, 0)
            counter[owner] = n + 1
            category = job.category
            if category is None and det.category_id is not None:
                category = CATEGORIES.get(det.category_id)
            columns["id"].append(item_id(job.relative, n))
            columns["image"].append(job.relative)
            columns["image_sha256"].append(job.sha256)
            columns["phash"].append(job.phash)
            columns["item"].append(n)
            columns["box"].append([float(v) for v in det.box])
            columns["score"].append(float(det.score))
            columns["category"].append(category)
            columns["caption"].append(caption)
            columns["caption_source"].append(source)
            columns["model_fingerprint"].append(self.settings.fingerprint)
            columns["created"].append(stamp)
            columns["updated"].append(stamp)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(owners), self.settings.dim)
        columns["vector"] = pa.FixedSizeListArray.from_arrays(  # type: ignore[assignment]
            pa.array(vectors.reshape(-1)), self.settings.dim
        )
        return pa.table(columns, schema=self.schema)
