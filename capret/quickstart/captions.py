"""Quickstart stage ``captions``: pixel-only captions of every item (both splits), template backend.

Captions are functions of the pixels and the box (DESIGN.md "No oracle by default"). The garment category
named in them comes from a category model (:mod:`captioning.category`, kind :data:`CATEGORY_KIND`: the
``pixel-cnn`` ensemble of :mod:`captioning.category_cnn`) trained here on the *train* split's crops and labels,
within :data:`CATEGORY_SECONDS` (crop extraction and every member; each member also stops at its step count),
and saved beside the captions (``captions.train.category_model/``). Reported: its accuracy on held-out train
identities (each item predicted by the member that never saw its garment), on the train captions and on the
validation items (scored against the annotation here, after prediction; no checkpoint is chosen on it). The
train captions use those out-of-fold predictions, so their category is as often wrong as on unseen garments
and the retrieval model cannot learn to trust a memorised category word. (On the photograph demo,
``--world demo``, categories are assigned in turn, independently of the pixels: expect chance there.)

The demo dataset has the DeepFashion2 layout, so captions are keyed by ``Item.key`` exactly like real
DeepFashion2 captions and the training stages join them the same way. Like DeepFashion2, the demo numbers
images from 1 in every split, so ``Item.key`` repeats across splits: each split gets its own store
(``captions.train.jsonl``, ``captions.validation.jsonl``) and ``ctx.state["captions"]`` maps split -> path;
``ctx.state["predicted_categories"]`` maps split -> key -> predicted category. The stores and the category
model are resumable: re-running the quickstart reuses them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from capret.errors import MissingFileError
from captioning.backends import create_backend
from captioning.category import (
    CategoryModel,
    category_model_dir,
    fit_category_model_on_targets,
    load_category_model,
)
from captioning.loop import LoopConfig
from captioning.prompts import get_prompt_set
from captioning.runner import caption_source, caption_targets
from captioning.sources import create_source, store_binding
from captioning.store import CaptionStore, failures_path, read_records

from . import QuickstartContext

SPLITS = ("train", "validation")
#: The registered category model the stage trains.
CATEGORY_KIND = "pixel-cnn"
#: Time budget of the category model (crop extraction + every member's fitting), on one CPU thread.
CATEGORY_SECONDS = 30.0


def run(ctx: QuickstartContext) -> dict[str, Any]:
    """Train the category model, then caption the demo items into ``ctx.out_dir / "captions.<split>.jsonl"``."""
    prompts = get_prompt_set("capret-chat-v1")
    captioned = skipped = failed = 0
    example = ""
    stores: dict[str, Path] = {}
    targets = {
        split: create_source("demo", root=ctx.data_root, split=split, progress=False)
        for split in SPLITS
        if (ctx.data_root / split).is_dir()
    }
    if "train" not in targets:
        raise MissingFileError(f"no demo train split under {ctx.data_root} (the category model trains on it)")
    folder = category_model_dir(ctx.out_dir / "captions.train.jsonl")
    cross_fitted = None  # a reused model: the train captions that need them are already stored
    category_model = _reusable_model(ctx.out_dir, folder)
    if category_model is None:
        category_model, cross_fitted = fit_category_model_on_targets(
            targets["train"], out_dir=folder, kind=CATEGORY_KIND, seed=ctx.seed, max_seconds=CATEGORY_SECONDS
        )
    predicted: dict[str, dict[str, str]] = {}
    accuracy: dict[str, float] = {}
    with create_backend("template") as backend:
        for split, split_targets in targets.items():
            path = ctx.out_dir / f"captions.{split}.jsonl"
            with CaptionStore(path, binding=store_binding("demo", split, split_targets)) as store:
                summary = caption_targets(
                    split_targets,
                    store=store,
                    backend=backend,
                    prompts=prompts,
                    config=LoopConfig(),
                    batch_size=32,
                    category_model=category_model,
                    cross_fitted=cross_fitted if split == "train" else None,
                )
            stores[split] = path
            captioned += summary.done
            skipped += summary.skipped
            failed += summary.failed
            records = read_records(path)
            example = example or summary.example or next(iter(records.values()), {}).get("caption", "")
            predicted[split] = {k: r.get("category", {}).get("name", "") for k, r in records.items()}
            truth = {t.key: t.annotation.get("category_name") for t in split_targets}  # scoring only
            scored = [k for k in predicted[split] if k in truth]
            accuracy[split] = sum(predicted[split][k] == truth[k] for k in scored) / max(len(scored), 1)
    ctx.state["captions"] = stores
    ctx.state["predicted_categories"] = predicted
    ctx.state["category_model"] = folder
    metrics = category_model.metrics
    clip_captioner = _score_clip_captioner(ctx) if "clip" in ctx.state else None
    return {
        "category_accuracy": accuracy.get("validation"),
        "clip_captioner": clip_captioner,
        "captioned": captioned,
        "skipped": skipped,
        "failed": failed,
        "example": example,
        "stores": {split: str(path) for split, path in stores.items()},
        "caption_source": caption_source(oracle=False),
        "category_model": {
            "dir": str(folder),
            "kind": category_model.kind,
            "config": category_model.config(),
            "steps": metrics.get("steps", metrics.get("epochs")),
            "heldout_accuracy": metrics.get("heldout_accuracy"),
            "train_accuracy": metrics.get("train_accuracy"),
            "cross_fitted_train_accuracy": metrics.get("cross_fitted_accuracy"),
            "train_captions_category_accuracy": accuracy.get("train"),
            "majority_class_heldout_accuracy": metrics.get("majority_class_heldout_accuracy"),
            "chance_accuracy": metrics.get("chance_accuracy"),
            "validation_accuracy": accuracy.get("validation"),
            "seconds": metrics.get("seconds_with_features", metrics.get("seconds")),
        },
    }


def _reusable_model(out_dir: Path, folder: Path) -> CategoryModel | None:
    """The saved category model of an earlier run, if it is of :data:`CATEGORY_KIND`; a model of another kind
    (an older quickstart's) is removed together with the caption stores it named categories in, so they are
    captioned again with the new model instead of mixing two models' categories."""
    if not (folder / "model.safetensors").is_file():
        return None
    model = load_category_model(folder)
    if model.kind == CATEGORY_KIND:
        return model
    shutil.rmtree(folder)
    for split in SPLITS:
        (out_dir / f"captions.{split}.jsonl").unlink(missing_ok=True)
        failures_path(out_dir / f"captions.{split}.jsonl").unlink(missing_ok=True)
    return None


def _score_clip_captioner(ctx: QuickstartContext) -> dict[str, Any]:
    """The ``clip`` caption backend on the validation items, scored attribute by attribute against the world's
    truth file (read here, after the predictions, and nowhere else in the quickstart's retrieval half)."""
    from capret.data.deepfashion2 import image_path, load_items
    from capret.data.garments import load_truth
    from capret.data.garments.vocab import describe
    from capret.data.garments.world import deepfashion2_truth
    from capret.data.imagefile import decode_image
    from capret.evaluation.attributes import attribute_accuracy
    from capret.inference.query.clip_captioner import ClipAttributeDescriber

    items = load_items(ctx.data_root, "validation", progress=False)
    describer = ClipAttributeDescriber.from_folder(ctx.state["clip"])
    images = [decode_image(image_path(ctx.data_root, "validation", item.image_id)) for item in items]
    predicted = describer.predict(images, [item.bbox for item in items])
    # scoring only: the truth of each item the world annotated
    truth = deepfashion2_truth(load_truth(ctx.garment_world()), "validation")
    scored = [
        (guess, truth[key])
        for item, guess in zip(items, predicted)
        if (key := (item.image_id, item.item_index)) in truth
    ]
    per_attribute = attribute_accuracy([g for g, _ in scored], [t for _, t in scored])
    return {
        "model_dir": str(ctx.state["clip"]),
        "items": len(scored),
        "category_accuracy": per_attribute.get("category", {}).get("accuracy"),
        "attribute_accuracy": {name: values["accuracy"] for name, values in per_attribute.items()},
        "attribute_majority": {name: values["majority"] for name, values in per_attribute.items()},
        "example": describe(predicted[0]) if predicted else "",
    }
