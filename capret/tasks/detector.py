"""Task ``detector``: train the DeepFashion2 clothing detector (Faster / Mask R-CNN) with the shared trainer.

``capret-train --config configs/deepfashion2_detector.yaml [key=value ...]`` builds a :class:`DetectorConfig`
and calls :func:`run`. Training data is a COCO instances dataset: the file named by ``data.train_coco`` (e.g.
the official ``deepfashion2_to_coco.py`` output) or, by default, the export of ``<root>/<split>/annos`` by
:func:`capret.data.deepfashion2.to_coco`, written once to ``<output_dir>/coco_<split>.json`` and reused. Every
item counts for detection (also ``style == 0`` ones: they are clothes, just not retrieval identities).

The task gives the trainer torchvision's loss dict (``loss_classifier``, ``loss_box_reg``, ``loss_objectness``,
``loss_rpn_box_reg``, ``loss_mask``) and its sum as ``loss``; AMP, DDP, resume and safetensors checkpoints come
from the engine.

Checkpoints are never selected on the split that is reported: ``data.holdout_images`` (default 5%) of the train
split's images, each with all its annotations, are held out of training (:func:`split_holdout_images`), and
validation during training (``evaluate``: COCO box AP from pycocotools, class-aware (``box_ap``, the monitored
metric) and any-class, ``mask_ap`` too for Mask R-CNN) scores them. After training the selected (or, without a
holdout, the last) weights are exported as a detector folder (``eval.export_dir``, default
``<output_dir>/model``) that :func:`capret.load_detector` reads, and the reported split (``data.val_split``) is
scored exactly once with it by the same metric code (:func:`detection_metrics`): ``final_metrics`` in the result
and ``<output_dir>/final_metrics.json``.

Augmentation is a horizontal flip decided by the sampler from ``(seed, epoch)``, so an interrupted run resumes
on the same flips.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from capret.config import cfg, to_dict
from capret.data.items import check_holdout_fraction, draw_holdout
from capret.engine.distributed import DistContext
from capret.engine.trainer import TrainerConfig
from capret.errors import BadImageError, ConfigError, DataError
from capret.inference.detectors import pil_to_tensor, predict_coco
from capret.io import atomic_write_json, read_json
from capret.models.detector import ClothingDetector, DetectorModelConfig
from capret.tasks.registry import register_task
from capret.tasks.train_export import SplitsConfig, selected_weights, train_and_export

__all__ = [
    "CocoDetectionDataset",
    "DetectorConfig",
    "DetectorTask",
    "detection_metrics",
    "load_coco_split",
    "run",
    "split_holdout_images",
]

logger = logging.getLogger(__name__)

#: the config field of the held-out share (named by its errors)
HOLDOUT_FIELD = "data.holdout_images"


@dataclass
class DetectorDataConfig(SplitsConfig):
    """Where the images and their COCO annotations are. ``val_split`` is never used for selection: it is scored
    once, after training, with the exported weights; checkpoints (``trainer.monitor``) are selected on held-out
    train images (``holdout_images``)."""

    holdout_images: float = cfg(
        0.05,
        "share of the train split's images (each with all its annotations) held out of training for validation "
        "and checkpoint selection; 0 = no validation during training (the last weights are exported)",
    )
    train_coco: str | None = cfg(None, "COCO instances JSON of the train split; null = export the annos")
    val_coco: str | None = cfg(None, "COCO instances JSON of the validation split; null = export the annos")
    batch_size: int = cfg(4, "images per batch (per rank)")
    flip: bool = cfg(True, "random horizontal flips (p = 0.5)")
    recolour: float = cfg(
        0.0,
        "probability of recolouring a training image (channels permuted, then grey with p 0.3, gains 0.6-1.4 "
        "per channel): makes colour useless for the class, so the detector learns silhouettes",
    )
    max_images: int | None = cfg(
        None, "use the first N train-split images (by id) only, the held-out ones included (debugging)"
    )


@dataclass
class DetectorEvalConfig:
    """Validation during and after training."""

    batch_size: int = cfg(8, "images per forward pass during validation")
    max_images: int | None = cfg(
        None, "score the first N images (by id) of the holdout and of val_split only; null = all"
    )
    export_dir: str | None = cfg(None, "detector folder written after training; null = <output_dir>/model")


@dataclass
class DetectorConfig:
    """Everything ``capret-train`` needs for task ``detector``."""

    task: str = cfg("detector", "task name (fixed)")
    data: DetectorDataConfig = cfg(factory=DetectorDataConfig, help="data")
    model: DetectorModelConfig = cfg(factory=DetectorModelConfig, help="detector architecture")
    trainer: TrainerConfig = cfg(
        factory=lambda: TrainerConfig(monitor="box_ap"), help="training loop (shared trainer)"
    )
    eval: DetectorEvalConfig = cfg(factory=DetectorEvalConfig, help="validation")


def load_coco_split(
    *, root: str | Path, split: str, coco_file: str | Path | None, cache_dir: Path | None
) -> dict[str, Any]:
    """The COCO dict of a split: ``coco_file`` if given, else the (cached) export of its DeepFashion2 annos."""
    if coco_file is not None:
        path = Path(coco_file)
        if not path.is_file():
            raise DataError("COCO annotation file does not exist", path=path)
        data = read_json(path, what="COCO annotation file")
        if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
            raise DataError("expected a COCO instances object with 'images' and 'annotations'", path=path)
        return data
    cached = cache_dir / f"coco_{split}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return json.loads(cached.read_text())  # type: ignore[no-any-return]
    from capret.data.deepfashion2 import load_items, to_coco

    data = to_coco(load_items(root, split, progress=False), root=root, split=split)
    if cached is not None:
        atomic_write_json(cached, data)
    return data


def split_holdout_images(
    coco: dict[str, Any], *, fraction: float, seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(training COCO, held-out COCO)``: whole images of a *train* split held out for model selection.

    Checkpoints must never be selected on the split that is reported (DESIGN.md), so validation during training
    runs on images the model never trains on, drawn from the train split itself. Each image goes to one side with
    all its annotations (an image's garments are seen together or not at all). ``max(1, round(fraction * n))``
    images are held out (none when ``fraction`` is 0; at most ``n - 1``, so one remains to train on), chosen by a
    seeded permutation of the sorted image ids (:func:`capret.data.items.draw_holdout`), so a config and seed
    always hold out the same photos.
    """
    held = draw_holdout(
        [int(im["id"]) for im in coco["images"]],
        fraction=fraction,
        seed=seed,
        field=HOLDOUT_FIELD,
        what="train image(s)",
    )

    def subset(inside: bool) -> dict[str, Any]:
        return {
            **coco,
            "images": [im for im in coco["images"] if (int(im["id"]) in held) == inside],
            "annotations": [a for a in coco["annotations"] if (int(a["image_id"]) in held) == inside],
        }

    return subset(False), subset(True)


def detection_metrics(
    model: ClothingDetector,
    *,
    coco: dict[str, Any],
    image_root: Path,
    batch_size: int,
    max_images: int | None,
) -> dict[str, float]:
    """COCO box AP of ``model`` on the images of ``coco`` (class-aware ``box_*`` and any-class
    ``box_ap*_any_class``; ``mask_*`` too for Mask R-CNN), the number of images scored (``val_images``) and
    ``detections_per_image``.

    The one metric code of the task: the holdout during training and the reported split after it are scored by
    it, so the two sets of figures mean the same thing.
    """
    from capret.evaluation.detection import coco_detection_ap

    results, image_ids = predict_coco(
        model, coco=coco, image_root=image_root, batch_size=batch_size, max_images=max_images
    )
    metrics = {f"box_{k}": v for k, v in coco_detection_ap(coco, results, image_ids=image_ids).items()}
    # Class-agnostic AP: how well garments are found, whatever category they are given (a box reported under
    # several classes is one finding, at its best score).
    agnostic = coco_detection_ap(coco, one_result_per_box(results), image_ids=image_ids, use_categories=False)
    metrics.update({"box_ap_any_class": agnostic["ap"], "box_ap50_any_class": agnostic["ap50"]})
    if model.has_masks:
        segm = coco_detection_ap(coco, results, iou_type="segm", image_ids=image_ids)
        metrics.update({f"mask_{k}": v for k, v in segm.items()})
    metrics["val_images"] = float(len(image_ids))
    metrics["detections_per_image"] = len(results) / max(1, len(image_ids))
    return metrics


def _mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_util

    if not segmentation:
        return np.zeros((height, width), dtype=np.uint8)
    if isinstance(segmentation, list):
        rles = mask_util.frPyObjects([p for p in segmentation if len(p) >= 6], height, width)
        if not rles:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_util.merge(rles)
    else:
        rle = segmentation
    return np.asarray(mask_util.decode(rle), dtype=np.uint8)


def recolour(pixels: Tensor, seed: int) -> Tensor:
    """A random recolouring of ``[3, H, W]`` pixels in [0, 1], a pure function of ``seed``: the channels in a
    random order, then (p 0.3) grey, then a random gain in [0.6, 1.4] per channel.

    In the garment world many identities of one category share a colour, and a detector trained from scratch
    on a few hundred photos learns "orange means outwear" long before it learns sleeves; recolouring breaks
    that shortcut while keeping every edge and silhouette.
    """
    rng = np.random.default_rng(seed)
    out = pixels[torch.from_numpy(rng.permutation(3))]
    if rng.random() < 0.3:
        out = out.mean(0, keepdim=True).expand(3, -1, -1)
    gains = torch.from_numpy(rng.uniform(0.6, 1.4, size=(3, 1, 1)).astype(np.float32))
    return (out * gains).clamp(0.0, 1.0)


class CocoDetectionDataset(torch.utils.data.Dataset):
    """``(image [3, H, W] in [0, 1], target)`` per COCO image; indexed by ``(index, flip)`` or ``(index, flip,
    recolour seed)`` from the sampler (a seed < 0 keeps the colours)."""

    def __init__(self, coco: dict[str, Any], *, image_root: Path, masks: bool) -> None:
        self.images = sorted(coco["images"], key=lambda im: int(im["id"]))
        self.image_root = image_root
        self.masks = masks
        self._annotations: dict[int, list[dict[str, Any]]] = {}
        for ann in coco["annotations"]:
            if not ann.get("iscrowd", 0):
                self._annotations.setdefault(int(ann["image_id"]), []).append(ann)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, bool] | tuple[int, bool, int]) -> tuple[Tensor, dict[str, Tensor]]:
        index, flip = key[0], key[1]
        colour_seed = key[2] if len(key) > 2 else -1
        entry = self.images[index]
        path = self.image_root / entry["file_name"]
        try:
            with Image.open(path) as im:
                pixels = pil_to_tensor(im)
        except OSError as exc:
            raise BadImageError(f"cannot read image ({exc})", path=path) from None
        height, width = pixels.shape[1:]
        boxes, labels, masks = [], [], []
        for ann in self._annotations.get(int(entry["id"]), []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            x1, y1 = max(0.0, x), max(0.0, y)
            x2, y2 = min(float(width), x + w), min(float(height), y + h)
            if x2 - x1 < 1 or y2 - y1 < 1:  # degenerate boxes break the box-regression targets
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(int(ann["category_id"]))
            if self.masks:
                masks.append(_mask(ann.get("segmentation"), height, width))
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        if self.masks:
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width)
            target["masks"] = target["masks"].to(torch.uint8)
        if flip:
            pixels = pixels.flip(-1)
            b = target["boxes"]
            target["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        if colour_seed >= 0:
            pixels = recolour(pixels, colour_seed)
        return pixels, target


class FlipBatchSampler(torch.utils.data.Sampler[list[tuple[int, bool, int]]]):
    """Shuffled, rank-sharded, equal-sized batches of ``(index, flip, recolour seed)``, a pure function of (seed,
    epoch); the recolour seed is -1 (colours kept) unless ``recolour`` > 0 picks the image."""

    def __init__(
        self,
        size: int,
        *,
        batch_size: int,
        flip: bool,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        recolour: float = 0.0,
    ) -> None:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(size)
        flips = rng.random(size) < 0.5 if flip else np.zeros(size, dtype=bool)
        colour_rng = np.random.default_rng([seed, epoch, 1])  # its own stream: flips stay what they were
        colours = np.where(colour_rng.random(size) < recolour, colour_rng.integers(0, 2**31, size), -1)
        per_step = batch_size * world_size
        usable = (size // per_step) * per_step
        if usable == 0:
            raise ConfigError(
                f"{size} training images cannot fill one step of {batch_size} x {world_size} ranks"
            )
        self.batches = [
            [
                (int(order[i]), bool(flips[i]), int(colours[i]))
                for i in range(start + rank * batch_size, start + (rank + 1) * batch_size)
            ]
            for start in range(0, usable, per_step)
        ]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        return iter(self.batches)


def _collate(samples: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    return [s[0] for s in samples], [s[1] for s in samples]


def one_result_per_box(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """COCO results with each (image, box) kept once, at its best score: the same box reported under several
    classes counts once when classes do not matter."""
    best: dict[tuple[int, tuple[float, ...]], dict[str, Any]] = {}
    for record in results:
        key = (int(record["image_id"]), tuple(float(v) for v in record["bbox"]))
        if key not in best or record["score"] > best[key]["score"]:
            best[key] = record
    return list(best.values())


class DetectorTask:
    """The :class:`~capret.engine.trainer.TrainTask` of the clothing detector."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        data = config.data
        # checked before the (possibly long) COCO export
        check_holdout_fraction(data.holdout_images, field=HOLDOUT_FIELD)
        self.cache_dir = Path(config.trainer.output_dir)
        train_coco = load_coco_split(
            root=data.root, split=data.train_split, coco_file=data.train_coco, cache_dir=self.cache_dir
        )
        if data.max_images is not None:
            keep = sorted(train_coco["images"], key=lambda im: int(im["id"]))[: data.max_images]
            train_coco = {**train_coco, "images": keep}
        if not train_coco["images"]:
            raise DataError("no training images", path=Path(data.root) / data.train_split)
        self.image_root = Path(data.root) / data.train_split / "image"
        train_coco, self.holdout_coco = split_holdout_images(
            train_coco, fraction=data.holdout_images, seed=config.trainer.seed
        )
        self.dataset = CocoDetectionDataset(
            train_coco, image_root=self.image_root, masks=config.model.arch == "mask_rcnn"
        )
        self._model: ClothingDetector | None = None
        self.dist = DistContext()  # replaced by the trainer's ``setup`` call

    def setup(self, dist: DistContext) -> None:
        self.dist = dist

    def build_model(self) -> nn.Module:
        self._model = ClothingDetector(self.config.model)
        return self._model

    def train_dataloader(
        self, *, rank: int, world_size: int, epoch: int, seed: int
    ) -> torch.utils.data.DataLoader:
        sampler = FlipBatchSampler(
            len(self.dataset),
            batch_size=self.config.data.batch_size,
            flip=self.config.data.flip,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            recolour=self.config.data.recolour,
        )
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=_collate,
            num_workers=self.config.trainer.num_workers,
        )

    def training_step(
        self, model: nn.Module, batch: tuple[list[Tensor], list[dict[str, Tensor]]]
    ) -> dict[str, Tensor]:
        images, targets = batch
        losses = model(list(images), list(targets))
        terms = {name: value for name, value in losses.items()}
        terms["loss"] = sum(losses.values(), torch.zeros((), device=images[0].device))
        return terms

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Model-selection metrics on the held-out *train* images (empty without a holdout)."""
        if not self.holdout_coco["images"]:
            return {}
        module = getattr(model, "module", model)
        if not isinstance(module, ClothingDetector):
            raise TypeError(f"expected the ClothingDetector, got {type(module).__name__}")
        return detection_metrics(
            module,
            coco=self.holdout_coco,
            image_root=self.image_root,
            batch_size=self.config.eval.batch_size,
            max_images=self.config.eval.max_images,
        )

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.config)


def run(config: DetectorConfig, *, resume: str | None = None) -> dict[str, Any]:
    """Train, then export the selected (or last) weights as a ``detector`` model folder and score the reported
    split once with them."""
    task = DetectorTask(config)

    def export(result: dict[str, Any], folder: Path) -> dict[str, Any]:
        model = selected_weights(
            task._model if task._model is not None else ClothingDetector(config.model), result
        )
        model.cpu().save_pretrained(folder)
        held = len(task.holdout_coco["images"])
        extra: dict[str, Any] = {
            "selection": "holdout train images" if held else "none (last weights)",
            "holdout_images": held,
            "train_images": len(task.dataset),
        }
        data = config.data
        if data.val_split:
            # The one evaluation of the reported split, after selection is over.
            val_coco = load_coco_split(
                root=data.root, split=data.val_split, coco_file=data.val_coco, cache_dir=task.cache_dir
            )
            reported = detection_metrics(
                model.to(task.dist.device),
                coco=val_coco,
                image_root=Path(data.root) / data.val_split / "image",
                batch_size=config.eval.batch_size,
                max_images=config.eval.max_images,
            )
            final = {"split": data.val_split, **reported}
            atomic_write_json(Path(config.trainer.output_dir) / "final_metrics.json", final, indent=2)
            extra["final_metrics"] = final
        return extra

    return train_and_export(
        task, config.trainer, resume=resume, export=export, export_dir=config.eval.export_dir
    )


register_task("detector", DetectorConfig, run)
