"""Quickstart stage ``detector``: train the demo clothing detector and report its COCO box AP.

The recipe (:data:`DEMO_RECIPE`) is a two-stage CenterNet (:mod:`capret.models.centernet`) from random
initialisation (no weights can be downloaded here): a tiny plain CNN finds class-agnostic garment centres and
boxes on 96-pixel inputs, and a crop classifier names each box's category from a 32-pixel crop of the photo.
It has no anchors, proposals or RoI heads, so several times more images fit in the budget than with the Faster
R-CNN this stage trained before (0.013 class-aware AP50 after 101 steps). Training images are flipped and, half
of them, recoloured (colour tells little about the category in the garment world). The recipe selects nothing
(``trainer.eval_every`` 0, ``data.holdout_images`` 0): it trains on every train image and exports the last
weights, which the task then scores once on the validation split.

The step budget is planned, then capped by time: a few steps of a throwaway model are timed on the first training
batches (:func:`planned_steps`), the cosine schedule is laid over the steps that fit in ``ctx.train_seconds`` (or
:data:`DEFAULT_TRAIN_SECONDS`), and the trainer also stops at that many seconds if the machine slows down. Box AP
(class-aware and any-class, pycocotools) is measured on every validation image, from the task's
``final_metrics``. The whole stage is meant to fit
in about a minute on 2 CPUs.

Artefacts: the detector folder ``ctx.out_dir / "detector"`` (loads with :func:`capret.inference.detectors.
load_detector`), the run ``ctx.out_dir / "detector_run"``, and ``ctx.state["detector"]`` (the folder's path).
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from capret.config import from_dict, to_dict
from capret.io import default_device
from capret.quickstart import QuickstartContext

DEFAULT_TRAIN_SECONDS = 50.0
#: validation images scored (null = all of them)
VAL_IMAGES: int | None = None
#: bounds of the planned step budget, and the steps timed to plan it (after one untimed step)
MIN_STEPS, MAX_STEPS, CALIBRATION_STEPS = 20, 2000, 5
#: share of the budget planned from the timed steps: the trainer's own work per step (clipping, checks, logging)
#: is not timed, and training steps measured 1.1-1.3 times the calibrated ones on the shared 2-core machine
PLANNED_SHARE = 0.75

#: The demo recipe (also in configs/demo_detector.yaml, which tests keep equal to it).
DEMO_RECIPE: dict[str, Any] = {
    "task": "detector",
    "data": {
        "train_split": "train",
        "val_split": "validation",
        "holdout_images": 0.0,  # no selection: every train image trains, the last weights are exported
        "batch_size": 16,
        "flip": True,
        "recolour": 0.5,
    },
    "model": {
        "arch": "centernet",
        "backbone": "tiny_cnn",
        "backbone_width": 16,
        "fpn_channels": 32,
        "weights": None,
        "backbone_weights": None,
        "min_size": 96,
        "max_size": 96,
        "score_threshold": 0.001,
        "nms_threshold": 0.5,
        "detections_per_image": 100,
    },
    "trainer": {
        "max_steps": 400,
        "lr": 0.005,
        "weight_decay": 0.0001,
        "warmup_steps": 20,
        "schedule": "cosine",
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
    "eval": {"batch_size": 16, "max_images": VAL_IMAGES},
}


def planned_steps(config: Any, *, seconds: float) -> tuple[int, float]:
    """``(steps, seconds per step)``: how many training steps of ``config`` fit in ``seconds`` on this machine.

    Times :data:`CALIBRATION_STEPS` steps (after one untimed one; their median counts) of a throwaway model of the
    recipe on the task's own first batches (image decoding, flips and recolouring included), with AdamW at
    learning rate 0 and the threads in use. Planning the steps lets the cosine schedule end where training ends;
    the trainer's time cap still stops a run that the machine slows down later. The COCO export of the train split
    is cached in the run folder, where the training run finds it.
    """
    from capret.tasks.detector import DetectorTask

    Path(config.trainer.output_dir).mkdir(parents=True, exist_ok=True)
    task = DetectorTask(config)
    model = task.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    loader = task.train_dataloader(rank=0, world_size=1, epoch=0, seed=config.trainer.seed)
    timings: list[float] = []
    batches = iter(loader)
    for step in range(CALIBRATION_STEPS + 1):
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:  # a training split smaller than the calibration: start it again
            batches = iter(loader)
            batch = next(batches)
        loss = task.training_step(model, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step:  # the first step pays for allocations and lazy imports
            timings.append(time.perf_counter() - start)
    per_step = statistics.median(timings)  # one step slowed by another job's burst does not set the plan
    steps = int(seconds * PLANNED_SHARE / max(per_step, 1e-6))
    return max(MIN_STEPS, min(MAX_STEPS, steps)), per_step


def demo_config(
    *, data_root: Path, run_dir: Path, export_dir: Path, seed: int, seconds: float, steps: int | None = None
) -> Any:
    """The :class:`~capret.tasks.detector.DetectorConfig` of the quickstart run (``steps``: the planned step
    budget, else the recipe's ``max_steps``; ``seconds``: the time cap)."""
    from capret.tasks.detector import DetectorConfig

    recipe = to_dict(from_dict(DetectorConfig, DEMO_RECIPE))
    recipe["data"]["root"] = str(data_root)
    recipe["trainer"].update(output_dir=str(run_dir), seed=seed, max_seconds=float(seconds), progress=False)
    if steps is not None:
        recipe["trainer"]["max_steps"] = int(steps)
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
        steps, step_seconds = planned_steps(config, seconds=seconds)
        config.trainer.max_steps = steps
        result = train_task(config)
    finally:
        used = torch.get_num_threads()
        torch.set_num_threads(threads)
    # the validation split, scored once with the exported weights (``result["metrics"]`` would be the holdout's)
    metrics = result.get("final_metrics") or {}
    ctx.state["detector"] = export_dir
    return {
        "box_ap": float(metrics.get("box_ap", 0.0)),
        "box_ap50": float(metrics.get("box_ap50", 0.0)),
        "box_ap75": float(metrics.get("box_ap75", 0.0)),
        "box_ar100": float(metrics.get("box_ar100", 0.0)),
        "box_ap_any_class": float(metrics.get("box_ap_any_class", 0.0)),
        "box_ap50_any_class": float(metrics.get("box_ap50_any_class", 0.0)),
        "val_images": int(metrics.get("val_images", 0)),
        "arch": config.model.arch,
        "backbone": config.model.backbone,
        "input_size": config.model.min_size,
        "planned_steps": steps,
        "calibrated_step_seconds": round(step_seconds, 4),
        "train_steps": int(result.get("steps", 0)),
        "train_seconds": float(result.get("seconds", 0.0)),
        "torch_threads": used,
        "model_dir": str(export_dir),
    }
