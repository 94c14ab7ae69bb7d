"""Quickstart stage ``cir``: composed image retrieval on the garment world, every method on the tiny CLIP.

The world's FashionIQ-layout split (``world/fashioniq``: reference/target pairs of one category whose attributes
differ in one or two ways, two relative captions each) is scored with ONE protocol,
:func:`capret.inference.cir.benchmarks.evaluate_cir` on ``val`` (the CLIP4Cir protocol ``capret-eval cir``
runs), for every method, all standing on the tiny CLIP the ``clip`` stage pretrained:

* the shortcuts ``image-only``, ``text-only`` and ``sum`` (reference feature, caption feature, their normalised
  sum): what a method has to beat to show it composes image and text at all;
* ``combiner`` — CLIP4Cir stage 2 (the Combiner on the frozen CLIP), trained on the world's FashionIQ *train*
  triplets and selected on held-out train triplets (:func:`selection_split`), never on val;
* ``searle-oti`` — SEARLE's optimisation-based textual inversion of each reference image at query time
  (:data:`OTI_STEPS` steps, the cosine loss alone: there is no LLM to write the regulariser's concept phrases, and
  with phrases written from the garment vocabulary OTI took three times as long, more than the budget allows);
* ``pic2word`` — Pic2Word's mapping trained on the unlabeled ``world/pretrain`` images;
* ``lincir`` — LinCIR's language-only phi trained on the ``world/pretrain`` alt-texts (no image);
* ``cirevl`` — the reference described by the ``clip`` caption backend (zero-shot attribute choice from the
  pixels), rewritten by its model-free rewriter (description + relative caption), encoded by the CLIP text tower.

Trained methods are time-budgeted (:data:`TRAIN_SECONDS`, scaled by ``--train-seconds``; the three shares sum to
140 s so data + clip + cir stay under ten minutes on two idle cores). Nothing reads
``world/truth.json``: training and scoring read the FashionIQ annotation files, the pretraining images and
alt-texts, and the ``clip`` captioner reads pixels only.

The quickstart's world (:data:`capret.quickstart.data.CIR_IDENTITIES` FashionIQ images) gives each category a
val gallery of about 100 images, so a random ranking's R@10 is about 0.1 and R@10 / R@50 separate the methods
(real FashionIQ galleries are 40-60 times larger, so the absolute figures are not comparable with the papers').
The report adds R@1 and R@5 of the same rankings (same metric function) and the chance level of every cut-off;
``note`` says when a gallery is too small for a cut-off to mean anything (a small ``--world`` of the tests).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from capret.config import from_dict
from capret.errors import DataError, UsageError
from capret.quickstart import QuickstartContext

#: training seconds of each trained method at the default budget (``--train-seconds T`` scales them by
#: ``T / capret.quickstart.clip.DEFAULT_TRAIN_SECONDS``, so T = 90 is the default everywhere)
#:
#: The shares were 45 / 35 / 35 s; on the world's held-out *train* triplets (the Combiner's selection split, never
#: val) LinCIR went from R@10 0.222 after 58 steps to 0.357 after 548, while Pic2Word stayed put (0.220 after 195
#: steps, 0.208 after 738), so LinCIR has the larger share.
TRAIN_SECONDS: dict[str, float] = {"combiner": 45.0, "pic2word": 25.0, "lincir": 70.0}
#: SEARLE-OTI steps per reference image at the default budget (the paper: 350; scaled down with the budget)
OTI_STEPS = 100
#: share of each category's TRAIN triplets held out to select the Combiner's checkpoint
HOLDOUT_FRACTION = 0.25
#: cut-offs reported (FashionIQ papers report 10 and 50; 1 and 5 discriminate on the world's small galleries)
KS: tuple[int, ...] = (1, 5, 10, 50)
#: the methods, in the order they run and appear in the report
METHOD_ORDER: tuple[str, ...] = (
    "image-only", "text-only", "sum", "combiner", "searle-oti", "pic2word", "lincir", "cirevl",
)  # fmt: skip
#: which of them are the shortcut baselines (the report lists the methods above all of them)
SHORTCUTS: tuple[str, ...] = ("image-only", "text-only")


def _scale(ctx: QuickstartContext) -> float:
    from capret.quickstart.clip import DEFAULT_TRAIN_SECONDS

    return 1.0 if ctx.train_seconds is None else float(ctx.train_seconds) / DEFAULT_TRAIN_SECONDS


def _trainer(out: Path, *, seed: int, seconds: float, lr: float, **extra: Any) -> dict[str, Any]:
    """A ``trainer`` section stopped by time (a section starts from TrainerConfig defaults: set what matters)."""
    return {
        "output_dir": str(out),
        "seed": seed,
        "max_seconds": max(1.0, seconds),
        "max_steps": 1_000_000,
        "lr": lr,
        "schedule": "constant",  # a time-stopped run never reaches a cosine schedule's end
        "warmup_steps": 0,
        "amp": "off",
        "eval_every": 0,
        "save_every": 0,
        "keep_last": 1,
        "log_every": 50,
        "num_workers": 0,
        "progress": False,
        "tensorboard": False,
        **extra,
    }


def _clip_section(clip_dir: Path) -> dict[str, Any]:
    # the folder's own open_clip config and weights, with the padding it was trained with
    return {"backend": "open_clip", "name": str(clip_dir), "pretrained": None, "preprocess": "targetpad"}


# ----------------------------------------------------------------------------------------- data for training


def selection_split(
    world_fiq: Path, dest: Path, *, seed: int, fraction: float = HOLDOUT_FRACTION
) -> dict[str, Any]:
    """A FashionIQ-layout folder whose ``train`` and ``val`` are the world's TRAIN triplets split in two.

    The Combiner task selects its checkpoint on its ``val_split``; pointing it at this folder makes that a
    held-out part of the training triplets (``fraction`` of each category, drawn with ``seed``), so the
    world's val triplets are never seen before the final evaluation. The held-out triplets rank every train
    image of the three categories (a category's own train gallery holds only 20-30 images, where R@10, the
    selection metric, is 1 after a few steps and cannot tell checkpoints apart); ``images`` links to (or, where
    links are refused, copies) the world's image folder.
    """
    from capret.data.fashioniq import CATEGORIES, load_json
    from capret.io import atomic_write_json

    if dest.exists():
        shutil.rmtree(dest)
    captions = {c: world_fiq / "captions" / f"cap.{c}.train.json" for c in CATEGORIES}
    galleries = {c: load_json(world_fiq / "image_splits" / f"split.{c}.train.json") for c in CATEGORIES}
    everything = list(dict.fromkeys(name for c in CATEGORIES for name in galleries[c]))
    counts: dict[str, dict[str, int]] = {}
    for category in CATEGORIES:
        triplets = load_json(captions[category])
        if len(triplets) < 2:
            continue  # nothing to hold out: the category is left out of training (absent from the counts)
        order = list(range(len(triplets)))
        random.Random(f"{seed}:{category}").shuffle(order)
        held = set(order[: max(1, round(fraction * len(triplets)))])
        parts = {
            "train": ([t for i, t in enumerate(triplets) if i not in held], galleries[category]),
            "val": ([t for i, t in enumerate(triplets) if i in held], everything),
        }
        for split, (records, gallery) in parts.items():
            atomic_write_json(dest / "captions" / f"cap.{category}.{split}.json", records)
            atomic_write_json(dest / "image_splits" / f"split.{category}.{split}.json", gallery)
        counts[category] = {split: len(records) for split, (records, _) in parts.items()}
    if not counts:
        raise DataError(
            "no FashionIQ category holds 2 train triplets; the Combiner has nothing to train and select on",
            path=world_fiq / "captions",
        )
    try:
        (dest / "images").symlink_to((world_fiq / "images").resolve(), target_is_directory=True)
    except OSError:
        shutil.copytree(world_fiq / "images", dest / "images")
    return {"triplets": counts, "gallery": len(everything)}


def pretrain_texts(pretrain: Path, dest: Path) -> Path:
    """The alt-texts of ``pretrain/train.jsonl`` as a JSON list (LinCIR's caption corpus; no image read)."""
    from capret.io import atomic_write_json

    texts = []
    for number, line in enumerate((pretrain / "train.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"line {number}: expected {{'image': ..., 'text': ...}}",
                                path=pretrain / "train.jsonl") from None  # fmt: skip
    if not texts:
        raise DataError("no alt-text to train LinCIR on", path=pretrain / "train.jsonl")
    return atomic_write_json(dest, texts)


# ----------------------------------------------------------------------------------------- trained methods


def _train_combiner(
    ctx: QuickstartContext, world: Path, clip_dir: Path, work: Path, seconds: float
) -> tuple[Path, dict]:
    from capret.tasks.combiner import CombinerTaskConfig
    from capret.tasks.combiner import run as train

    root = work / "combiner_selection"
    selection = selection_split(world / "fashioniq", root, seed=ctx.seed)
    pooled = sum(c["train"] for c in selection["triplets"].values())  # batches draw from all categories
    config = from_dict(
        CombinerTaskConfig,
        {
            "task": "combiner",
            "stage": 2,
            "data": {
                "dataset": "fashioniq",
                "root": str(root),
                "categories": list(selection["triplets"]),
                "feature_cache": "auto",
            },
            "model": {"clip": _clip_section(clip_dir), "stage1_checkpoint": None},
            # CLIP4Cir's Adam (weight decay 0); lr 1e-4 and batch 32 for ~100 triplets instead of 2e-5 / 4096
            "stage2": {"lr": 1e-4, "weight_decay": 0.0, "batch_size": min(32, pooled)},
            "trainer": _trainer(
                work / "combiner", seed=ctx.seed, seconds=seconds, lr=1e-4, optimizer="adamw", eps=1e-7,
                eval_every=100, monitor="average/recall@10", monitor_mode="max",
            ),
        },
    )  # fmt: skip
    result = train(config)
    return Path(result["model_dir"]), {
        "stage": 2,
        "train_steps": int(result["steps"]),
        "train_seconds": round(float(result["seconds"]), 2),
        "selected_on": "held-out train triplets",
        "selection_triplets": selection["triplets"],
        "selection_gallery": selection["gallery"],
        "selection_average_recall@10": result.get("best"),
        "selected_step": result.get("best_step"),
    }


def _train_mapper(
    task: str, ctx: QuickstartContext, world: Path, clip_dir: Path, work: Path, seconds: float
) -> tuple[Path, dict]:
    """Pic2Word on the pretraining images, or LinCIR on the pretraining alt-texts."""
    from capret.tasks.registry import get_task

    pretrain = world / "pretrain"
    if task == "pic2word":
        count = sum(1 for p in (pretrain / "images").rglob("*") if p.is_file())
        cache = str(work / "pic2word_features")
        data = {"images": str(pretrain / "images"), "batch_size": min(64, count), "feature_cache": cache}
        # Pic2Word's AdamW (betas 0.9/0.98, eps 1e-6, weight decay 0.1 on weights), lr 1e-4
        model = {"clip": _clip_section(clip_dir), "hidden_dim": 512, "dropout": 0.1, "placeholder": "*"}
        extra: dict[str, Any] = {"weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1e-6}
        lr = 1e-4
    else:
        corpus = pretrain_texts(pretrain, work / "lincir_captions.json")
        count = len(json.loads(corpus.read_text(encoding="utf-8")))
        data = {"captions": str(corpus), "batch_size": min(64, count), "keywords": "auto"}
        model = {"clip": _clip_section(clip_dir), "hidden_dim": 0, "dropout": 0.5, "placeholder": "$"}
        extra = {"weight_decay": 0.01}  # LinCIR's AdamW lr 1e-4, weight decay 0.01, constant schedule
        lr = 1e-4
    spec = get_task(task)
    config: Any = from_dict(
        spec.config_cls,
        {
            "task": task,
            "data": data,
            "model": model,
            "trainer": _trainer(work / task, seed=ctx.seed, seconds=seconds, lr=lr, **extra),
        },
    )
    encode_seconds = _encode_training_images(config) if task == "pic2word" else None
    result = spec.run(config)
    return Path(result["model_dir"]), {
        "train_steps": int(result["steps"]),
        "train_seconds": round(float(result["seconds"]), 2),
        **({"encode_seconds": round(encode_seconds, 2)} if encode_seconds is not None else {}),
        "trained_on": f"{count} pretrain {'images' if task == 'pic2word' else 'alt-texts'}",
        "final_loss": (result.get("final") or {}).get("loss"),
    }


def _encode_training_images(config: Any) -> float:
    """Fill Pic2Word's feature cache (``config.data.feature_cache``) with the frozen CLIP's features of its
    training images, and return the seconds it took.

    The task encodes them at its first batch, inside its time budget: on a busy CPU that ate most of its 35 s
    (13 steps in one run). Encoding first, like the ``clip`` task's preprocessing, gives every trained method
    its whole budget for steps; the cache is keyed by the CLIP's weights, so the run reads exactly these.
    """
    from capret.tasks.pic2word import Pic2WordTask

    start = time.perf_counter()
    warm = Pic2WordTask(config)
    warm.build_model()
    warm.image_table(warm.source)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------- evaluation


def _chance(sizes: dict[str, int]) -> dict[str, float]:
    """R@k of a random ranking, averaged over the categories as the metric averages them."""
    return {f"recall@{k}": sum(min(1.0, k / n) for n in sizes.values()) / len(sizes) for k in KS}


def _scores(evaluation: Any, benchmark: Any) -> dict[str, Any]:
    """R@10/50 as ``evaluate_cir`` scored them, plus R@1/5 of the same rankings by the same metric function;
    category averages and per category."""
    from capret.evaluation.cir import fashioniq_recall

    annotations = {u.name: u.dataset.annotations for u in benchmark.units}
    sizes = {u.name: len(u.gallery) for u in benchmark.units}
    extra = fashioniq_recall(
        dict(zip(annotations, evaluation.rankings["method"])), annotations, ks=(1, 5), gallery_sizes=sizes
    )
    got = {**evaluation.metrics, **extra}
    return {
        **{f"recall@{k}": got[f"average/recall@{k}"] for k in KS},
        "per_category": {c: {f"recall@{k}": got[f"{c}/recall@{k}"] for k in KS} for c in annotations},
    }


def _methods(
    ctx: QuickstartContext, world: Path, clip_dir: Path, work: Path
) -> dict[str, Callable[[], tuple[Any, dict[str, Any]]]]:
    """name -> a builder of the method (training it first when it is trained) and what to report about it."""
    from capret.inference.cir.methods import (
        CaptionerSpec,
        ClipSpec,
        MethodInputs,
        baseline,
        create_cir_method,
    )

    scale = _scale(ctx)
    spec = ClipSpec(name=str(clip_dir), backend="open_clip")
    inputs = MethodInputs(device="cpu", work_dir=work, clip=spec, progress=False)
    shared: dict[str, Any] = {}

    def shortcut(name: str) -> Callable[[], tuple[Any, dict[str, Any]]]:
        def build() -> tuple[Any, dict[str, Any]]:
            if "image-only" not in shared:  # one CLIP for the three shortcuts
                shared["image-only"] = create_cir_method("image-only", inputs)
            return baseline(name, shared["image-only"]), {}

        return build

    def combiner() -> tuple[Any, dict[str, Any]]:
        folder, info = _train_combiner(ctx, world, clip_dir, work, TRAIN_SECONDS["combiner"] * scale)
        return create_cir_method("combiner", MethodInputs(checkpoint=folder, progress=False)), info

    def mapper(task: str) -> Callable[[], tuple[Any, dict[str, Any]]]:
        def build() -> tuple[Any, dict[str, Any]]:
            folder, info = _train_mapper(task, ctx, world, clip_dir, work, TRAIN_SECONDS[task] * scale)
            method_inputs = MethodInputs(
                device="cpu", work_dir=work, clip=spec, mapper=folder, progress=False
            )
            return create_cir_method(task, method_inputs), info

        return build

    def searle_oti() -> tuple[Any, dict[str, Any]]:
        steps = max(10, round(OTI_STEPS * min(1.0, scale)))
        method_inputs = MethodInputs(
            device="cpu", work_dir=work, clip=spec, progress=False,
            oti_settings={"steps": steps, "batch_size": 64, "seed": ctx.seed},
        )  # fmt: skip
        return create_cir_method("searle-oti", method_inputs), {
            "oti_steps": steps,
            "phrase_regulariser": False,
        }

    def cirevl() -> tuple[Any, dict[str, Any]]:
        method_inputs = MethodInputs(
            device="cpu", work_dir=work, clip=spec, progress=False,
            captioner=CaptionerSpec(backend="clip", options={"model": str(clip_dir)}),
            caption_store=work / "cirevl_clip.jsonl",
        )  # fmt: skip
        info = {"captioner": "clip (zero-shot attributes)", "rewriter": "model-free (description, caption)"}
        return create_cir_method("cirevl", method_inputs), info

    return {
        "image-only": shortcut("image-only"),
        "text-only": shortcut("text-only"),
        "sum": shortcut("sum"),
        "combiner": combiner,
        "searle-oti": searle_oti,
        "pic2word": mapper("pic2word"),
        "lincir": mapper("lincir"),
        "cirevl": cirevl,
    }


def _val_categories(fiq: Path) -> tuple[list[str], list[str]]:
    """The categories with val triplets, and those without (a small world may leave one empty; a category
    without queries has no recall, so it is left out of the averages and named in the report)."""
    from capret.data.fashioniq import CATEGORIES, load_json

    counts = {c: len(load_json(fiq / "captions" / f"cap.{c}.val.json")) for c in CATEGORIES}
    kept = [c for c in CATEGORIES if counts[c]]
    if not kept:
        raise DataError("the world's FashionIQ val split holds no triplet", path=fiq / "captions")
    return kept, [c for c in CATEGORIES if not counts[c]]


def _clip_dir(ctx: QuickstartContext) -> Path:
    """The clip stage's CLIP: handed over in ``ctx.state``, else the folder an earlier run left (``--stages cir``)."""
    clip = ctx.state.get("clip")
    if clip is not None:
        return Path(clip)
    earlier = ctx.out_dir / "clip"
    if (earlier / "capret_model.json").is_file():
        return earlier
    raise UsageError(
        f"the cir stage needs the tiny CLIP of the clip stage; {earlier} holds none (run --task cir, which trains it)"
    )


def run(ctx: QuickstartContext) -> dict[str, Any]:
    """Train the trained methods (time-budgeted) and score every method on the world's FashionIQ val."""
    from capret.inference.cir.benchmarks import evaluate_cir, open_benchmark
    from capret.inference.cir.search import FeatureOptions
    from capret.quickstart.dual_stream import fastest_thread_count

    world = ctx.world_root
    if ctx.world != "garments" or world is None:
        raise UsageError("the cir stage needs the garment world's FashionIQ split (--world garments)")
    clip_dir = _clip_dir(ctx)
    work = ctx.out_dir / "cir"
    if work.exists():
        shutil.rmtree(work)  # every method is retrained on the current CLIP; nothing stale is read back
    work.mkdir(parents=True)
    categories, empty = _val_categories(world / "fashioniq")
    benchmark = open_benchmark("fashioniq", root=world / "fashioniq", split="val", categories=categories)
    sizes = {u.name: len(u.gallery) for u in benchmark.units}
    options = FeatureOptions(cache_dir=work / "features")
    results: dict[str, dict[str, Any]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(fastest_thread_count())
    try:
        for name, build in _methods(ctx, world, clip_dir, work).items():
            start = time.perf_counter()
            method, info = build()
            evaluation = evaluate_cir(method, benchmark, baselines=False, options=options)
            results[name] = {
                **_scores(evaluation, benchmark),
                "seconds": round(time.perf_counter() - start, 2),
                **info,
                **({"run": method.report()} if method.report() else {}),
            }
    finally:
        torch.set_num_threads(threads)
    best_shortcut = {f"recall@{k}": max(results[s][f"recall@{k}"] for s in SHORTCUTS) for k in KS}
    return {
        "benchmark": "fashioniq",
        "split": "val",
        "protocol": "capret.inference.cir.benchmarks.evaluate_cir (CLIP4Cir: category galleries, reference kept)",
        "clip": str(clip_dir),
        "gallery_sizes": sizes,
        "queries": {u.name: len(u.queries.references) for u in benchmark.units},
        "categories_without_val_triplets": empty,
        "chance": _chance(sizes),
        "methods": results,
        "above_both_shortcuts": {
            k: [n for n in results if n not in SHORTCUTS and n != "sum" and results[n][k] > v]
            for k, v in best_shortcut.items()
        },
        "budget": {
            "train_seconds": {k: round(v * _scale(ctx), 1) for k, v in TRAIN_SECONDS.items()},
            "oti_steps": max(10, round(OTI_STEPS * min(1.0, _scale(ctx)))),
        },
        "note": _note(sizes),
    }


def _note(sizes: dict[str, int]) -> str:
    """What the gallery sizes let the cut-offs say (a gallery no larger than k is ranked whole at R@k)."""
    listed = ", ".join(f"{k} {v}" for k, v in sizes.items())
    saturated = [k for k in KS if min(sizes.values()) <= k]
    if not saturated:
        return (
            f"val galleries of {listed} images: every cut-off ranks part of a gallery; read each recall against "
            "its chance level (see chance)"
        )
    return (
        f"val galleries of {listed} images: R@{saturated[0]} and above rank the smallest gallery whole (R@50 of a "
        "gallery under 50 images is 1 by construction), so read the lower cut-offs against their chance level "
        "(see chance)"
    )
