"""Quickstart stage ``clip``: a tiny CLIP pretrained on the garment world's image-text split.

The ``clip`` task (``configs/garments_clip.yaml``'s recipe, time-budgeted) trains an open_clip ViT on the
alt-text pairs of ``world/pretrain`` (identities disjoint from every other split) and exports ``ctx.out_dir /
"clip"`` (``kind: clip``). That folder is the stand-in for a pretrained vision-language model: the ``clip``
caption backend and every composed-retrieval method of the ``cir`` stage run on it.

Reported: held-out image-to-text / text-to-image recall on ``pretrain/val.jsonl`` (the split that selected the
checkpoint: it measures the pretraining, nothing downstream is selected on it) and zero-shot category accuracy on
the DeepFashion2 validation items (cropped to their boxes; labels read only to score).
"""

from __future__ import annotations

import shutil
from typing import Any

import torch

from capret.config import from_dict
from capret.data.deepfashion2 import image_path, load_items
from capret.data.imagefile import decode_image
from capret.quickstart import QuickstartContext

DEFAULT_TRAIN_SECONDS = 90.0


def run(ctx: QuickstartContext) -> dict[str, Any]:
    """Train (or reuse) the tiny CLIP; report its held-out retrieval and zero-shot category accuracy."""
    from capret.quickstart.dual_stream import fastest_thread_count
    from capret.tasks.clip import ClipTaskConfig, evaluate_clip, zero_shot_category_accuracy
    from capret.tasks.clip import run as train_clip

    pretrain = ctx.garment_world() / "pretrain"
    export_dir, run_dir = ctx.out_dir / "clip", ctx.out_dir / "clip_run"
    seconds = DEFAULT_TRAIN_SECONDS if ctx.train_seconds is None else float(ctx.train_seconds)
    trained: dict[str, Any] = {}
    if not (export_dir / "capret_model.json").is_file():
        if run_dir.exists():
            shutil.rmtree(run_dir)
        config = from_dict(
            ClipTaskConfig,
            {
                "data": {"root": str(pretrain)},
                "trainer": {
                    "output_dir": str(run_dir),
                    "seed": ctx.seed,
                    "max_seconds": seconds,
                    # the cosine schedule follows max_steps; the time budget may stop the run earlier
                    "max_steps": 300,
                    # configs/garments_clip.yaml's optimiser (a trainer section starts from the shared defaults)
                    "lr": 1e-3,
                    "weight_decay": 0.1,
                    "betas": [0.9, 0.98],
                    "eps": 1e-6,
                    "warmup_steps": 50,
                    "schedule": "cosine",
                    "clip_grad_norm": 5.0,
                    "monitor": "mean_recall@1",
                    "monitor_mode": "max",
                    "eval_every": 100,
                    "keep_last": 1,
                    "progress": False,
                    "tensorboard": False,
                },
                "eval": {"export_dir": str(export_dir)},
            },
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(fastest_thread_count())
        try:
            result = train_clip(config)
        finally:
            torch.set_num_threads(threads)
        trained = {
            "train_steps": int(result.get("steps", 0)),
            "train_seconds": float(result.get("seconds", 0.0)),
        }
    held_out = evaluate_clip(export_dir, pretrain / "val.jsonl")
    items = load_items(ctx.data_root, "validation", progress=False)
    images = [decode_image(image_path(ctx.data_root, "validation", item.image_id)) for item in items]
    zero_shot = zero_shot_category_accuracy(
        export_dir,
        images,
        [item.category_name for item in items],  # scoring only
        boxes=[item.bbox for item in items],
    )
    ctx.state["clip"] = export_dir
    return {
        "model_dir": str(export_dir),
        **trained,
        "heldout_i2t_recall@1": held_out.get("i2t_recall@1"),
        "heldout_t2i_recall@1": held_out.get("t2i_recall@1"),
        "heldout_chance_recall@1": held_out.get("chance_recall@1"),
        "heldout_i2t_recall@10": held_out.get("i2t_recall@10"),
        "heldout_t2i_recall@10": held_out.get("t2i_recall@10"),
        "heldout_pairs": held_out.get("pairs"),
        "zero_shot_category_accuracy": zero_shot["accuracy"],
        "zero_shot_chance": zero_shot["chance"],
        "zero_shot_items": zero_shot["count"],
    }
