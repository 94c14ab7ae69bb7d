"""Benchmark: CLIP4Cir stage-2 epoch time with the feature cache vs encoding images every step.

Stage 2 trains only the Combiner while CLIP is frozen, so the cache turns each epoch into MLP steps over
stored vectors. This script builds a CLIP of ViT-B/32 size with random weights (no download; the speed of a
forward pass does not depend on the weights), a FashionIQ-layout folder of placeholder images with a few
hundred triplets, and times one stage-2 epoch both ways with the same batches:

* ``cached``: ``CombinerTask.train_dataloader`` (features looked up in the cache) + Combiner step;
* ``uncached``: every step opens, preprocesses and encodes the batch's reference and target images and its
  captions with the frozen CLIP, then the same Combiner step.

Prints ONE JSON object. Target: ``speedup >= 20`` on CPU.

    python scripts/bench/combiner.py [--triplets 256] [--batch-size 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "is has red blue darker lighter longer shorter sleeves collar floral pattern shiny fitted loose".split()
)


def _write_dataset(root: Path, *, triplets: int, seed: int) -> None:
    """FashionIQ layout (one category, ``train`` and ``val``) with random captions and placeholder images."""
    rng = random.Random(seed)
    asins = [f"B{i:09d}" for i in range(int(triplets * 1.5))]
    records = []
    for _ in range(triplets):
        ref, tgt = rng.sample(asins, 2)
        caps = [" ".join(rng.choices(WORDS, k=6)), " ".join(rng.choices(WORDS, k=5))]
        records.append({"candidate": ref, "target": tgt, "captions": caps})
    for split in ("train", "val"):
        (root / "captions").mkdir(parents=True, exist_ok=True)
        (root / "image_splits").mkdir(parents=True, exist_ok=True)
        (root / "captions" / f"cap.dress.{split}.json").write_text(json.dumps(records))
        (root / "image_splits" / f"split.dress.{split}.json").write_text(json.dumps(asins))
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(seed)
    for asin in asins:
        w, h = int(gen.integers(200, 300)), int(gen.integers(240, 400))
        Image.fromarray(gen.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            images / f"{asin}.jpg", quality=90
        )


def _combiner_step(model, optimizer, reference, text, target) -> float:
    from capret.models.combiner import batch_classification_loss

    loss = batch_classification_loss(model(reference, text), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triplets", type=int, default=256, help="training triplets in the synthetic set")
    parser.add_argument("--batch-size", type=int, default=128, help="stage-2 batch size (paper: 4096)")
    parser.add_argument(
        "--preset", default="vit-b-32", help="CLIP size preset (capret.models.clip.CLIP_PRESETS)"
    )
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from capret.config import load_config
    from capret.tasks.combiner import CombinerTask, CombinerTaskConfig
    from capret.testing import save_random_clip

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        clip_dir = save_random_clip(tmp_path / "clip", preset=args.preset, texts=[" ".join(WORDS)] * 20)
        _write_dataset(tmp_path / "fiq", triplets=args.triplets, seed=args.seed)
        config = load_config(
            CombinerTaskConfig,
            None,
            [
                f"root={tmp_path / 'fiq'}",
                "categories=[dress]",
                f"clip.name={clip_dir}",
                "stage=2",
                "stage1_checkpoint=null",
                f"stage2.batch_size={args.batch_size}",
                f"trainer.output_dir={tmp_path / 'run'}",
                f"trainer.device={args.device}",
            ],
        )
        task = CombinerTask(config)
        combiner = task.build_model().to(args.device)
        optimizer = torch.optim.Adam(combiner.parameters(), lr=2e-5)
        clip = task.clip
        assert clip is not None

        start = time.perf_counter()
        task.train_dataloader(rank=0, world_size=1, epoch=0, seed=0)  # builds the image + text caches
        cache_build = time.perf_counter() - start

        warm = next(iter(task.train_dataloader(rank=0, world_size=1, epoch=0, seed=0)))
        _combiner_step(
            combiner, optimizer, warm["reference"], warm["text"], warm["target"]
        )  # Adam state init

        cached_runs = []
        for epoch in (1, 2, 3):  # short: take the median of three epochs
            start = time.perf_counter()
            batches = task.train_dataloader(rank=0, world_size=1, epoch=epoch, seed=0)
            for batch in batches:
                batch = {k: v.to(args.device) for k, v in batch.items()}
                _combiner_step(combiner, optimizer, batch["reference"], batch["text"], batch["target"])
            cached_runs.append(time.perf_counter() - start)
        cached = sorted(cached_runs)[1]
        steps = len(batches)

        index_batches, variant = task.epoch_batches(rank=0, world_size=1, epoch=1, seed=0)
        start = time.perf_counter()
        for idx in index_batches:
            trip = [task.triplets[i] for i in idx]
            with torch.no_grad():
                ref_px = torch.stack([clip.transform(task.load_image(t.reference)) for t in trip]).to(
                    args.device
                )
                tgt_px = torch.stack([clip.transform(task.load_image(t.target)) for t in trip]).to(
                    args.device
                )
                tokens = clip.tokenize([task.triplets[i].texts[variant[i]] for i in idx])
                text = clip.text_features(**{k: v.to(args.device) for k, v in tokens.items()})
                reference, target = clip.image_features(ref_px), clip.image_features(tgt_px)
            _combiner_step(combiner, optimizer, reference, text, target)
        uncached = time.perf_counter() - start

    print(
        json.dumps(
            {
                "benchmark": "combiner_stage2_epoch",
                "clip": f"{args.preset} (random init)",
                "device": args.device,
                "torch_threads": torch.get_num_threads(),
                "triplets": args.triplets,
                "batch_size": args.batch_size,
                "steps_per_epoch": steps,
                "cache_build_s": round(cache_build, 3),
                "epoch_cached_s": round(cached, 4),
                "epoch_uncached_s": round(uncached, 3),
                "speedup": round(uncached / cached, 1),
                "target_speedup": 20.0,
                "meets_target": uncached / cached >= 20.0,
            }
        )
    )


if __name__ == "__main__":
    main()
