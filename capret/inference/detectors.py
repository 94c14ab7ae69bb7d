"""The detector stage of the query pipeline: a small protocol, a registry, and the detectors that need no model.

A detector turns photos into clothing items::

    detector.detect(images: Sequence[PIL.Image]) -> list[list[Detection]]   # one list per image, best first

:class:`Detection` holds a box ``[x1, y1, x2, y2]`` in pixels (our convention everywhere), a score and a
DeepFashion2 ``category_id`` (or ``None``). Any object with that method is a detector: the trained torchvision
detector of the ``deepfashion2_detector`` task registers itself here under its own name, and users can pass
their own. Detectors that work from *files* rather than pixels — :class:`CocoResultsDetector`, which reads the
COCO results file of an external detector (detectron2, mmdetection) — also offer
``detect_files(paths) -> list[list[Detection]]``; the pipeline calls it when it knows the query's path.

Built in (:func:`create_detector`): ``whole_image`` (one item = the whole photo; what a shop catalogue of
single-product pictures needs) and ``coco_results`` (external detections). Boxes given by the caller bypass the
detector altogether (``RetrievalPipeline.search(image, boxes=...)``).

The trained detector: the trained clothing detector at inference: ``load_detector(folder).detect(images)``.

:class:`TrainedDetector` wraps a :class:`~capret.models.detector.ClothingDetector` model folder (written by the
``detector`` task or the quickstart) in the :class:`~capret.inference.detectors.Detector` protocol:
``detect(images) -> list[list[Detection]]``, one list per image, best first, boxes xyxy in the image's pixels.
It is registered as detector ``deepfashion2_detector`` (option ``path``), so a pipeline folder can name it.

:func:`predict_coco` runs a detector model over the images of a COCO dataset and returns COCO results, the
input of :func:`capret.evaluation.detection.coco_detection_ap` (validation AP during training).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from capret.errors import BadImageError, ConfigError, DataError
from capret.evaluation.detection import xyxy_to_xywh
from capret.inference.model_kinds import load, register_model_kind
from capret.io import default_device, read_json
from capret.models.detector import ClothingDetector
from capret.registry import Registry

__all__ = [
    "TrainedDetector",
    "load_detector",
    "pil_to_tensor",
    "predict_coco",
    "CocoResultsDetector",
    "Detection",
    "Detector",
    "FileDetector",
    "WholeImageDetector",
    "create_detector",
    "list_detectors",
    "register_detector",
    "run_detector",
]

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    """One detected item: ``box`` xyxy pixels, ``score`` in [0, 1], DeepFashion2 ``category_id`` or None."""

    box: Box
    score: float = 1.0
    category_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": [float(v) for v in self.box],
            "score": float(self.score),
            "category_id": self.category_id,
        }


@runtime_checkable
class Detector(Protocol):
    """Anything that finds items in decoded photos."""

    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]: ...


@runtime_checkable
class FileDetector(Protocol):
    """A detector whose answers are keyed by file (precomputed detections)."""

    def detect_files(self, paths: Sequence[str | Path]) -> list[list[Detection]]: ...


#: detectors with a model register themselves when their module is imported (on first use)
_DETECTORS: Registry[Detector] = Registry(
    "detector", lazy_modules={"deepfashion2_detector": "capret.inference.detectors"}
)
register_detector, create_detector, list_detectors = _DETECTORS.functions()


def run_detector(
    detector: Detector, images: Sequence[Image.Image], paths: Sequence[str | Path | None]
) -> list[list[Detection]]:
    """Detect with pixels, or with files for a :class:`FileDetector` (which then needs every path)."""
    if isinstance(detector, FileDetector):
        if any(p is None for p in paths):
            raise ConfigError(
                f"detector {type(detector).__name__} reads precomputed detections per file, so every query needs "
                "its file path (search by path, or pass boxes=...)"
            )
        return detector.detect_files([p for p in paths if p is not None])
    return detector.detect(images)


@register_detector("whole_image")
class WholeImageDetector:
    """One item per photo: the whole image (no detector; single-product shop photos, or pre-cropped queries)."""

    name = "whole_image"

    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        return [[Detection(box=(0.0, 0.0, float(im.width), float(im.height)))] for im in images]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def _coco_image_ids(images_file: Path | None) -> dict[str, int]:
    """``file name -> image_id`` from a COCO annotation/image-list file (``{"images": [{"id", "file_name"}]}``)."""
    if images_file is None:
        return {}
    if not images_file.is_file():
        raise DataError("COCO images file does not exist", path=images_file)
    data = read_json(images_file, what="COCO images file")
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DataError("expected a COCO JSON object with an 'images' list", path=images_file)
    try:
        return {Path(str(e["file_name"])).name: int(e["id"]) for e in entries}
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"'images' entries need 'id' and 'file_name' ({exc})", path=images_file) from None


@register_detector("coco_results")
class CocoResultsDetector:
    """Detections of an external detector, read from a COCO results file.

    The file is a JSON list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` (what detectron2's
    and mmdetection's COCO evaluators write). A query file is matched to its ``image_id`` through ``images_file``
    (a COCO annotation file's ``images`` list: ``file_name`` -> ``id``) or, without one, through the numeric file
    stem (DeepFashion2 names images ``000123.jpg`` = image 123). Detections below ``score_threshold`` are
    dropped; at most ``max_items`` per image are kept, best first. An image without detections gives ``[]``.
    """

    name = "coco_results"

    def __init__(
        self,
        *,
        path: str | Path,
        images_file: str | Path | None = None,
        score_threshold: float = 0.0,
        max_items: int = 10,
    ) -> None:
        self.path = Path(path)
        self.images_file = Path(images_file) if images_file is not None else None
        self.score_threshold = float(score_threshold)
        self.max_items = int(max_items)
        if not math.isfinite(self.score_threshold) or self.score_threshold < 0:
            raise ConfigError(f"score_threshold must be a finite number >= 0, got {score_threshold!r}")
        if self.max_items < 1:
            raise ConfigError(f"max_items must be >= 1, got {max_items!r}")
        if not self.path.is_file():
            raise DataError("COCO results file does not exist", path=self.path)
        # syntax errors and duplicate keys are named here; NaN/Infinity below, with the entry that holds it
        results = read_json(self.path, what="COCO results file", allow_nonfinite=True)
        if not isinstance(results, list):
            raise DataError("a COCO results file is a JSON list of detections", path=self.path)
        self._by_image: dict[int, list[Detection]] = {}
        for number, entry in enumerate(results):
            try:
                x, y, w, h = (float(v) for v in entry["bbox"])
                image_id = int(entry["image_id"])
                det = Detection(
                    box=(x, y, x + w, y + h),
                    score=float(entry["score"]),  # no default: a missing score is not a confident one
                    category_id=int(entry["category_id"]) if entry.get("category_id") is not None else None,
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(
                    f"entry {number} needs image_id, bbox [x, y, w, h], score ({exc}): {entry!r}",
                    path=self.path,
                ) from None
            if not all(math.isfinite(v) for v in (x, y, w, h, det.score)):
                raise DataError(
                    f"entry {number} has a non-finite bbox or score (NaN/Infinity): {entry!r}", path=self.path
                )
            if w <= 0 or h <= 0:
                raise DataError(f"entry {number} has an empty box {entry['bbox']}", path=self.path)
            if det.score >= self.score_threshold:
                self._by_image.setdefault(image_id, []).append(det)
        for dets in self._by_image.values():
            dets.sort(key=lambda d: -d.score)
        self._ids = _coco_image_ids(self.images_file)

    def image_id(self, path: str | Path) -> int:
        name = Path(path).name
        if self._ids:
            if name not in self._ids:
                raise DataError(
                    f"image {name!r} is not listed in the COCO images file", path=self.images_file
                )
            return self._ids[name]
        stem = Path(path).stem
        if not stem.isdigit():
            raise DataError(
                f"cannot tell the COCO image_id of {name!r}: its stem is not a number; pass images_file (a COCO "
                "annotation file listing file_name and id)",
                path=self.path,
            )
        return int(stem)

    def detect_files(self, paths: Sequence[str | Path]) -> list[list[Detection]]:
        return [list(self._by_image.get(self.image_id(p), []))[: self.max_items] for p in paths]

    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        raise ConfigError(
            "coco_results detections are keyed by file: give the query as a file path (or pass boxes=...)"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "images_file": str(self.images_file) if self.images_file else None,
            "score_threshold": self.score_threshold,
            "max_items": self.max_items,
        }


def pil_to_tensor(image: Image.Image) -> Tensor:
    """``[3, H, W]`` float in [0, 1], what torchvision's detectors take (they normalise internally)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _detections(output: dict[str, Tensor], *, score_threshold: float, max_items: int) -> list[Detection]:
    """The best ``max_items`` detections above the threshold, one per box: a model that reports one box under
    several classes (the ``centernet`` detector, for COCO's class-aware AP) gives the item its best class."""
    keep = output["scores"] >= score_threshold
    boxes, scores, labels = output["boxes"][keep], output["scores"][keep], output["labels"][keep]
    found: list[Detection] = []
    seen: set[tuple[float, ...]] = set()
    for i in torch.argsort(scores, descending=True, stable=True).tolist():
        box = tuple(float(v) for v in boxes[i].tolist())
        if box in seen:
            continue
        seen.add(box)
        found.append(Detection(box=box, score=float(scores[i]), category_id=int(labels[i])))  # type: ignore[arg-type]
        if len(found) >= max_items:
            break
    return found


class TrainedDetector:
    """A trained :class:`ClothingDetector` behind the ``Detector`` protocol (no annotation is ever read)."""

    name = "deepfashion2_detector"

    def __init__(
        self,
        model: ClothingDetector,
        *,
        device: str | torch.device | None = None,
        score_threshold: float = 0.05,
        max_items: int = 10,
        batch_size: int = 8,
        path: Path | None = None,
    ) -> None:
        self.device = default_device(device)
        self.model = model.to(self.device).eval()
        self.score_threshold = float(score_threshold)
        self.max_items = int(max_items)
        self.batch_size = int(batch_size)
        self.path = path

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        out: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            batch = [pil_to_tensor(im).to(self.device) for im in images[start : start + self.batch_size]]
            for prediction in self.model(batch):  # type: ignore[union-attr]
                out.append(
                    _detections(
                        {k: v.cpu() for k, v in prediction.items() if k != "masks"},
                        score_threshold=self.score_threshold,
                        max_items=self.max_items,
                    )
                )
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "score_threshold": self.score_threshold,
            "max_items": self.max_items,
            "model": self.model.config.backbone,
        }


def load_detector(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    score_threshold: float = 0.05,
    max_items: int = 10,
    batch_size: int = 8,
) -> TrainedDetector:
    """Load a detector model folder (or a run folder holding ``model/``) for inference: :func:`capret.load`
    with ``kind="detector"``, then this call's thresholds."""
    detector = load(path, kind="detector", device=device)
    assert isinstance(detector, TrainedDetector)  # the registered loader below returns one
    detector.score_threshold = float(score_threshold)
    detector.max_items = int(max_items)
    detector.batch_size = int(batch_size)
    return detector


@register_model_kind("detector")
def _load_trained_detector(folder: Path, *, device: str | torch.device | None = None) -> TrainedDetector:
    """A ``detector`` model folder (``capret_model.json``, or the legacy ``capret_detector.json``)."""
    return TrainedDetector(ClothingDetector.from_pretrained(folder), device=device, path=folder)


@register_detector("deepfashion2_detector")
def _registered(
    *,
    path: str | Path,
    device: str | None = None,
    score_threshold: float = 0.05,
    max_items: int = 10,
    batch_size: int = 8,
) -> TrainedDetector:
    return load_detector(
        path, device=device, score_threshold=score_threshold, max_items=max_items, batch_size=batch_size
    )


@torch.no_grad()
def predict_coco(
    model: ClothingDetector,
    *,
    coco: dict[str, Any],
    image_root: str | Path,
    batch_size: int = 8,
    max_images: int | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], list[int]]:
    """COCO results of ``model`` on the images of ``coco`` (``file_name`` under ``image_root``).

    Returns ``(results, image_ids)``: the results (boxes xywh; masks as RLE for Mask R-CNN) and the ids of the
    images that were run (the first ``max_images`` in id order), so AP is computed on exactly those.
    """
    from pycocotools import mask as mask_util

    device = next(model.parameters()).device
    model.eval()
    images = sorted(coco["images"], key=lambda im: int(im["id"]))[:max_images]
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(images), desc="detector eval", unit="img", disable=not progress)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = []
        for entry in chunk:
            path = Path(image_root) / entry["file_name"]
            try:
                with Image.open(path) as im:
                    pixels.append(pil_to_tensor(im).to(device))
            except OSError as exc:
                raise BadImageError(f"cannot read image ({exc})", path=path) from None
        for entry, out in zip(chunk, model(pixels)):  # type: ignore[arg-type]
            boxes, scores, labels = out["boxes"].cpu(), out["scores"].cpu(), out["labels"].cpu()
            masks = out.get("masks")
            for j in range(len(scores)):
                record: dict[str, Any] = {
                    "image_id": int(entry["id"]),
                    "category_id": int(labels[j]),
                    "bbox": xyxy_to_xywh(boxes[j].tolist()),
                    "score": float(scores[j]),
                }
                if masks is not None:
                    binary = (masks[j, 0] > 0.5).cpu().numpy().astype(np.uint8)
                    rle = mask_util.encode(np.asfortranarray(binary))
                    rle["counts"] = rle["counts"].decode("ascii")
                    record["segmentation"] = rle
                results.append(record)
        bar.update(len(chunk))
    bar.close()
    return results, [int(im["id"]) for im in images]
