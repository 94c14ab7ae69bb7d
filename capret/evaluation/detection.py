"""COCO-style detection AP with pycocotools (the metric every DeepFashion2 detector reports).

:func:`coco_detection_ap` scores a list of COCO results (``{"image_id", "category_id", "bbox": xywh, "score"}``,
plus ``"segmentation"`` RLE for masks) against a COCO ground-truth dict such as
:func:`capret.data.deepfashion2.to_coco` writes. It is a thin adapter: ``COCO`` indexing, ``loadRes`` and
``COCOeval`` do the work, so the numbers are the official ones. Boxes are xyxy everywhere else in capret and
become xywh only here, at the pycocotools boundary (:func:`xyxy_to_xywh`).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

__all__ = ["STAT_NAMES", "coco_detection_ap", "xyxy_to_xywh"]

#: Names of COCOeval's 12 summary numbers, in its order.
STAT_NAMES = (
    "ap",
    "ap50",
    "ap75",
    "ap_small",
    "ap_medium",
    "ap_large",
    "ar1",
    "ar10",
    "ar100",
    "ar_small",
    "ar_medium",
    "ar_large",
)


def xyxy_to_xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def coco_detection_ap(
    ground_truth: dict[str, Any],
    results: Sequence[dict[str, Any]],
    *,
    iou_type: Literal["bbox", "segm"] = "bbox",
    image_ids: Sequence[int] | None = None,
    use_categories: bool = True,
) -> dict[str, float]:
    """COCOeval summary of ``results`` on ``ground_truth`` (``{"ap", "ap50", ..., "ar100", ...}``, in [0, 1]).

    Args:
        ground_truth: a COCO dataset dict (``images``, ``annotations``, ``categories``).
        results: COCO result entries; none at all gives 0 everywhere (pycocotools cannot load an empty list).
        iou_type: ``bbox`` or ``segm``.
        image_ids: evaluate only these images (default: every image of ``ground_truth``).
        use_categories: ``False`` is COCOeval's class-agnostic mode (``useCats = 0``): localisation alone, which
            separates "finds the garment" from "names its category".
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys(STAT_NAMES, 0.0)
    gt = COCO()
    dataset = copy.copy(ground_truth)
    # loadRes copies "images" from the GT and COCOeval needs areas; the rest of the dict is not read.
    dataset["annotations"] = [
        {k: v for k, v in a.items() if k not in ("keypoints",)} for a in ground_truth["annotations"]
    ]
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes([dict(r) for r in results])
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.params.useCats = int(use_categories)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where a size range has no ground truth; keep that convention visible as NaN-free 0.
    stats = np.asarray(evaluator.stats, dtype=np.float64)
    return {name: float(max(value, 0.0)) for name, value in zip(STAT_NAMES, stats)}
