"""Quickstart stage ``detector``: train the demo clothing detector and report its COCO box AP.

A Faster R-CNN on timm's MobileNetV3-Large with a narrow (64-channel) FPN from random initialisation (no weights can be downloaded here) on
small images, trained by the ``detector`` task with the shared trainer for a time budget (``ctx.train_seconds``
or :data:`DEFAULT_TRAIN_SECONDS`), then scored with pycocotools on the first :data:`VAL_IMAGES` validation images.
The whole stage (COCO export, training, validation, export) is meant to fit in about a minute on 2 CPUs.

Artefacts: the detector folder ``ctx.out_dir / "detector"`` (loads with :func:`capret.inference.detectors.
load_detector`), the run ``ctx.out_dir / "detector_run"``, and ``ctx.state["detector"]`` (the folder's path).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from capret.config import from_dict, to_dict
from capret.io import default_device
from capret.quickstart import QuickstartContext

DEFAULT_TRAIN_SECONDS = 30.0
VAL_IMAGES = 60

#: The demo recipe (also in configs/demo_detector.yaml, which tests keep equal to it).
DEMO_RECIPE: dict[str, Any] = {
    "task": "detector",
    "data": {"train_split": "train", "val_split": "validation", "batch_size": 4, "flip": True},
    "model": {
        "arch": "faster_rcnn",
        "backbone": "timm:mobilenetv3_large_100",
        "fpn_channels": 64,
        "weights": None,
        "backbone_weights": None,
        "min_size": 128,
        "max_size": 160,
        "box_head_width": 256,
        "rpn_proposals_train": 300,
        "rpn_proposals_test": 100,
        "rpn_batch_size_per_image": 64,
        "box_batch_size_per_image": 64,
        "detections_per_image": 20,
    },
    "trainer": {
        "max_steps": 100_000,
        "lr": 0.002,
        "weight_decay": 0.0001,
        "warmup_steps": 10,
        "schedule": "constant",
        "clip_grad_norm": 10.0,
        "amp": "off",
        "log_every": 10,
        "eval_every": 0,
        "save_every": 0,
        "keep_last": 1,
        "monitor": "box_ap",
        "num_workers": 0,
        "tensorboard": False,
    },
    "eval": {"batch_size": 8, "max_images": VAL_IMAGES},
}


def demo_config(*, data_root: Path, run_dir: Path, export_dir: Path, seed: int, seconds: float) -> Any:
    """The :class:`~capret.tasks.detector.DetectorConfig` of the quickstart run."""
    from capret.tasks.detector import DetectorConfig

    recipe = to_dict(from_dict(DetectorConfig, DEMO_RECIPE))
    recipe["data"]["root"] = str(data_root)
    recipe["trainer"].update(output_dir=str(run_dir), seed=seed, max_seconds=float(seconds), progress=False)
    recipe["eval"]["export_dir"] = str(export_dir)
    return from_dict(DetectorConfig, recipe)


def run(ctx: QuickstartContext) -> dict[str, Any]:
    """Train the demo detector; report box AP (COCO, pycocotools) on validation and the detector folder."""
    from capret.quickstart.dual_stream import fastest_thread_count
    from capret.tasks.detector import run as train_task

    seconds = DEFAULT_TRAIN_SECONDS if ctx.train_seconds is None else float(ctx.train_seconds)
    run_dir, export_dir = ctx.out_dir / "detector_run", ctx.out_dir / "detector"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = demo_config(
        data_root=ctx.data_root, run_dir=run_dir, export_dir=export_dir, seed=ctx.seed, seconds=seconds
    )
    threads = torch.get_num_threads()
    if default_device().type == "cpu":
        torch.set_num_threads(fastest_thread_count())
    try:
        result = train_task(config)
    finally:
        used = torch.get_num_threads()
        torch.set_num_threads(threads)
    metrics = result.get("metrics") or {}
    ctx.state["detector"] = export_dir
    return {
        "box_ap": float(metrics.get("box_ap", 0.0)),
        "box_ap50": float(metrics.get("box_ap50", 0.0)),
        "box_ap75": float(metrics.get("box_ap75", 0.0)),
        "box_ar100": float(metrics.get("box_ar100", 0.0)),
        "box_ap_any_class": float(metrics.get("box_ap_any_class", 0.0)),
        "box_ap50_any_class": float(metrics.get("box_ap50_any_class", 0.0)),
        "val_images": int(metrics.get("val_images", 0)),
        "backbone": config.model.backbone,
        "train_steps": int(result.get("steps", 0)),
        "train_seconds": float(result.get("seconds", 0.0)),
        "torch_threads": used,
        "model_dir": str(export_dir),
    }
