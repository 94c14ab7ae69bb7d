"""The trained clothing detector at inference: ``load_detector(folder).detect(images)``.

:class:`TrainedDetector` wraps a :class:`~capret.models.detector.ClothingDetector` model folder (written by the
``detector`` task or the quickstart) in the :class:`~capret.inference.detection.Detector` protocol:
``detect(images) -> list[list[Detection]]``, one list per image, best first, boxes xyxy in the image's pixels.
It is registered as detector ``deepfashion2_detector`` (option ``path``), so a pipeline folder can name it.

:func:`predict_coco` runs a detector model over the images of a COCO dataset and returns COCO results, the
input of :func:`capret.evaluation.detection.coco_detection_ap` (validation AP during training).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from capret.errors import BadImageError
from capret.evaluation.detection import xyxy_to_xywh
from capret.inference.detection import Detection, register_detector
from capret.io import default_device, resolve_model_folder
from capret.models.detector import DETECTOR_CONFIG_FILE, ClothingDetector

__all__ = ["TrainedDetector", "load_detector", "pil_to_tensor", "predict_coco"]


def pil_to_tensor(image: Image.Image) -> Tensor:
    """``[3, H, W]`` float in [0, 1], what torchvision's detectors take (they normalise internally)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _detections(output: dict[str, Tensor], *, score_threshold: float, max_items: int) -> list[Detection]:
    keep = output["scores"] >= score_threshold
    boxes, scores, labels = output["boxes"][keep], output["scores"][keep], output["labels"][keep]
    order = torch.argsort(scores, descending=True, stable=True)[:max_items]
    return [
        Detection(
            box=tuple(float(v) for v in boxes[i].tolist()),  # type: ignore[arg-type]
            score=float(scores[i]),
            category_id=int(labels[i]),
        )
        for i in order.tolist()
    ]


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
    """Load a detector model folder (or a run folder holding ``model/`` or ``detector/``) for inference."""
    folder = resolve_model_folder(path, markers=(DETECTOR_CONFIG_FILE,))
    model = ClothingDetector.from_pretrained(folder)
    return TrainedDetector(
        model,
        device=device,
        score_threshold=score_threshold,
        max_items=max_items,
        batch_size=batch_size,
        path=folder,
    )


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
