"""Throughput of the DeepFashion2 training input pipeline against what a GPU consumes (one JSON object).

A large GPU trains a ViT-B-size dual-stream model at about a thousand items per second; this measures how many
items per second the training loader delivers — ``ItemDataset`` (decode + item crop + augmentations) +
``ItemCollator`` (stack + tokenize) behind the ``PKBatchSampler``, built the way ``capret/tasks/dualstream.py``
builds it — in the main process (``num_workers`` 0), with one worker and with two, for each photo decoder of
``ItemDataset(decode=...)``:

* ``pil`` — today's path (PIL full decode, crop, bicubic resize): the reference;
* ``torchvision`` — ``torchvision.io.decode_jpeg`` for colour JPEGs (same libjpeg-turbo IDCT, pixels compared);
* ``reduced`` — PIL ``Image.draft`` DCT-domain decoding at 1/2, 1/4 or 1/8 when the item crop stays at least
  ``image_size`` after the reduction (box scaled with it).

Each decoder's output is compared with ``pil`` on the same items and sample seeds (max / mean absolute pixel
difference in 0-255 units, after undoing the normalisation). The bare loop is ``PIL.Image.open(p).convert("RGB")``
over the photos of the same batches. ``workers_needed`` is ``ceil(--gpu-items-per-s / items_per_s_per_worker)``
with the one-worker rate (a worker is one process; more workers than cores only help while waiting on disk).

Data: a garment world rendered at ``--size`` (DeepFashion2 photos are ~600-800 px) into ``--world`` (reused when
present) — crops are then smaller than the photos, as in DeepFashion2.

At ``--image-size`` 224 and 640-px photos few crops are large enough for a reduced decode, so the reduced path is
also compared and timed at ``--small-image-size`` (``reduced_at_small_input``).

    python scripts/bench/input_pipeline.py [--world DIR] [--size 640] [--batches 6] [--gpu-items-per-s 1000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

# this folder holds a benchmark named captioning.py, which would shadow the captioning package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from capret.data.deepfashion2 import image_path, load_items  # noqa: E402
from capret.data.garments import build_world  # noqa: E402
from capret.data.imagefile import decode_image  # noqa: E402
from capret.data.items import (  # noqa: E402
    ITEM_DECODES,
    ItemCollator,
    ItemDataset,
    ItemTransform,
    PKBatchSampler,
    identity_labels,
)
from capret.testing import train_tokenizer  # noqa: E402

#: caption-like texts of realistic length (the tokenizer's cost is part of the collate step)
CAPTIONS = [
    "a navy short sleeve top with white horizontal stripes, a round neckline and buttons, made of cotton",
    "a long red dress with a floral pattern, a v neckline and pockets, photographed from the side",
    "black denim trousers with a zip and a small logo, slim fit, zoomed in on the legs",
    "a green long sleeve outwear with a collar and pockets, checked pattern, partly occluded",
]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _dataset(root: Path, *, image_size: int, decode: str, augment: bool = True) -> ItemDataset:
    items = [it for it in load_items(root, "train", progress=False) if it.style > 0]
    labels, _ = identity_labels(items)
    transform = ItemTransform(image_size=image_size, mean=MEAN, std=STD, mode="crop", augment=augment)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(len(items))]
    return ItemDataset(
        root=root,
        split="train",
        items=items,
        labels=labels,
        transform=transform,
        captions=captions,
        decode=decode,
    )


def _tokenize_fn() -> Any:
    tokenizer = train_tokenizer(CAPTIONS * 8, vocab_size=300, context_length=64)

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return tokenize


def _loader(dataset: ItemDataset, *, workers: int, p: int, k: int, epoch: int) -> torch.utils.data.DataLoader:
    sampler = PKBatchSampler(
        dataset.labels, [it.source for it in dataset.items], p=p, k=k, seed=0, epoch=epoch
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=ItemCollator(_tokenize_fn()),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def _loader_rate(
    dataset: ItemDataset, *, workers: int, p: int, k: int, batches: int, repeats: int
) -> dict[str, float]:
    """The best of ``repeats`` runs (a shared machine only ever slows a run down)."""
    runs = [_loader_run(dataset, workers=workers, p=p, k=k, batches=batches) for _ in range(repeats)]
    return max(runs, key=lambda r: r["items_per_s"])


def _loader_run(dataset: ItemDataset, *, workers: int, p: int, k: int, batches: int) -> dict[str, float]:
    """Items/s over ``batches`` batches after one warm-up batch (worker start-up timed apart)."""
    start = time.perf_counter()
    loader = iter(_loader(dataset, workers=workers, p=p, k=k, epoch=0))
    next(loader)
    startup = time.perf_counter() - start
    items, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(loader)
        except StopIteration:
            break
        items += len(batch["label"])
    seconds = time.perf_counter() - start
    return {"items_per_s": round(items / seconds, 2), "items": items, "first_batch_s": round(startup, 3)}


def _decode_rates(paths: list[Path], *, repeats: int) -> dict[str, float]:
    """Photos/s of each decoder alone (no crop, no augmentation), interleaved, best of ``repeats``."""
    ways = {
        "pil": lambda p: decode_image(p),
        "torchvision": lambda p: decode_image(p, decoder="torchvision"),
        **{f"pil_reduce_{f}": (lambda p, f=f: decode_image(p, reduce=f)) for f in (2, 4, 8)},
    }
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(repeats):
        for name, decode in ways.items():
            start = time.perf_counter()
            for path in paths:
                decode(path)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: round(len(paths) / seconds, 2) for name, seconds in best.items()}


def _bare_rate(paths: list[Path], *, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            with Image.open(path) as image:
                image.convert("RGB")
        best = min(best, time.perf_counter() - start)
    return round(len(paths) / best, 2)


def _compare(root: Path, *, image_size: int, decode: str, n: int) -> dict[str, Any]:
    """Pixel difference of ``decode`` against the ``pil`` reference on ``n`` items with the same sample seeds."""
    reference = _dataset(root, image_size=image_size, decode="pil")
    other = _dataset(root, image_size=image_size, decode=decode)
    scale = torch.tensor(STD).view(3, 1, 1) * 255.0
    step = max(1, len(reference) // n)
    max_diff, mean_diffs, box_diff, reduced = 0.0, [], 0.0, 0
    for index in range(0, len(reference), step)[:n]:
        a, b = reference[(index, index + 1)], other[(index, index + 1)]
        diff = ((a["pixels"] - b["pixels"]) * scale).abs()
        max_diff = max(max_diff, float(diff.max()))
        mean_diffs.append(float(diff.mean()))
        box_diff = max(box_diff, float((a["box"] - b["box"]).abs().max()))
        if decode == "reduced":
            item = reference.items[index]
            with Image.open(image_path(root, "train", item.image_id)) as probe:
                reduced += other.transform.reduce_factor(probe.size, item.bbox) > 1
    out = {
        "items": len(mean_diffs),
        "max_abs_pixel_diff": round(max_diff, 2),
        "mean_abs_pixel_diff": round(float(np.mean(mean_diffs)), 3),
        "max_abs_box_diff": round(box_diff, 5),
    }
    if decode == "reduced":
        out["items_decoded_reduced"] = reduced
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--world", type=Path, default=Path("/tmp/capret_input_pipeline_world"), help="world folder"
    )
    p.add_argument("--identities", type=int, default=24, help="DeepFashion2 identities of the rendered world")
    p.add_argument("--size", type=int, default=640, help="longest side of the rendered photos")
    p.add_argument("--image-size", type=int, default=224, help="model input side (ViT-B: 224)")
    p.add_argument("--p", type=int, default=4, help="identities per batch")
    p.add_argument("--k", type=int, default=4, help="items per identity")
    p.add_argument("--batches", type=int, default=6, help="timed batches per setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers settings")
    p.add_argument("--decoders", nargs="+", default=list(ITEM_DECODES), choices=ITEM_DECODES)
    p.add_argument("--compare-items", type=int, default=24, help="items compared against the pil reference")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting (the best is kept)")
    p.add_argument(
        "--small-image-size",
        type=int,
        default=112,
        help="second model input side at which the reduced decode applies to more items (compared + timed)",
    )
    p.add_argument("--gpu-items-per-s", type=float, default=1000.0, help="GPU training step rate to feed")
    args = p.parse_args()
    torch.set_num_threads(1)

    if not (args.world / "world.json").is_file():
        build_world(args.world, seed=0, identities=args.identities, cir_identities=2, pretrain_identities=2,
                    size=args.size)  # fmt: skip
    root = args.world / "deepfashion2"
    reference = _dataset(root, image_size=args.image_size, decode="pil")
    sampler = PKBatchSampler(
        reference.labels, [it.source for it in reference.items], p=args.p, k=args.k, seed=0, epoch=0
    )
    batch_items = [i for batch in list(sampler)[: args.batches + 1] for i, _ in batch]
    paths = [image_path(root, "train", reference.items[i].image_id) for i in batch_items]
    with Image.open(paths[0]) as first:
        photo_size = first.size
    boxes = np.asarray([reference.items[i].bbox for i in batch_items])
    result: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_average_1min": round(os.getloadavg()[0], 2),
        },
        "data": {
            "world": str(args.world),
            "photo_size": list(photo_size),
            "median_box_wh": [round(float(v), 1) for v in np.median(boxes[:, 2:] - boxes[:, :2], axis=0)],
            "image_size": args.image_size,
            "batch": args.p * args.k,
            "timed_batches": args.batches,
            "augment": True,
        },
        "decoders": {},
    }
    datasets = {decode: _dataset(root, image_size=args.image_size, decode=decode) for decode in args.decoders}
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    bare: list[float] = []
    for _ in range(args.repeats):  # settings interleaved, so a burst of load from other jobs hits all of them
        bare.append(_bare_rate(paths, repeats=1))
        for decode, dataset in datasets.items():
            for w in args.workers:
                runs.setdefault((decode, w), []).append(
                    _loader_run(dataset, workers=w, p=args.p, k=args.k, batches=args.batches)
                )
    result["bare_pil_open_convert_items_per_s"] = max(bare)
    for decode in args.decoders:
        rates = {f"workers_{w}": max(runs[decode, w], key=lambda r: r["items_per_s"]) for w in args.workers}
        entry: dict[str, Any] = {"loader": rates}
        per_worker = rates.get("workers_1", rates.get("workers_0"))
        if per_worker is not None:
            entry["items_per_s_per_worker"] = per_worker["items_per_s"]
            entry["workers_needed_for_gpu"] = math.ceil(args.gpu_items_per_s / per_worker["items_per_s"])
        if decode != "pil":
            entry["vs_pil"] = _compare(root, image_size=args.image_size, decode=decode, n=args.compare_items)
        result["decoders"][decode] = entry
    result["decode_only_items_per_s"] = _decode_rates(paths, repeats=args.repeats)
    if "reduced" in args.decoders and args.small_image_size:
        small: dict[str, Any] = {"image_size": args.small_image_size}
        for decode in ("pil", "reduced"):
            dataset = _dataset(root, image_size=args.small_image_size, decode=decode)
            small[f"{decode}_workers_0"] = _loader_rate(
                dataset, workers=0, p=args.p, k=args.k, batches=args.batches, repeats=args.repeats
            )
        small["reduced_vs_pil"] = _compare(
            root, image_size=args.small_image_size, decode="reduced", n=args.compare_items
        )
        result["reduced_at_small_input"] = small
    result["gpu_items_per_s"] = args.gpu_items_per_s
    bare = result["bare_pil_open_convert_items_per_s"]
    result["speedup_vs_bare_loop"] = {
        decode: {name: round(r["items_per_s"] / bare, 2) for name, r in entry["loader"].items()}
        for decode, entry in result["decoders"].items()
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
