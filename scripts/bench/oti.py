"""Benchmark: OTI throughput (images/s) batched vs one image at a time.

SEARLE's OTI optimises one pseudo-token per image for 350 steps; :func:`capret.inference.cir.oti.run_oti` optimises
a whole batch of images at once (the sum of per-image losses keeps every image's trajectory its own, so
batching changes speed, not results). This script builds an open_clip model with random weights (no download;
speed does not depend on the weights; default ViT-B-32, SEARLE's smaller backbone), writes placeholder
images and a small phrase file, and inverts the same images twice: ``--batch-size`` images per batch, and one
image per batch. It also reports the largest difference between the two runs' tokens.

Prints ONE JSON object.

    python scripts/bench/oti.py [--arch ViT-B-32] [--images 16] [--steps 10] [--batch-size 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch",
        default="ViT-B-32",
        help="open_clip architecture (random weights), or 'tiny' (capret.testing)",
    )
    parser.add_argument("--images", type=int, default=16, help="images to invert")
    parser.add_argument("--steps", type=int, default=10, help="OTI steps per image (paper: 350)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch in the batched run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from capret.inference.cir.concepts import PhraseBank
    from capret.inference.cir.oti import OTIConfig, TokenStore, run_oti
    from capret.models.clip import load_clip

    scratch = tempfile.TemporaryDirectory()
    name = args.arch
    if (
        args.arch == "tiny"
    ):  # the test suite's tiny open_clip: per-step overheads dominate, as with small batches
        from capret.testing import save_tiny_open_clip

        name = f"local-dir:{save_tiny_open_clip(Path(scratch.name) / 'tiny')}"
    clip = load_clip(name, backend="open_clip", pretrained=None, device=args.device)
    rng = np.random.default_rng(0)
    images = {
        f"img{i:04d}.jpg": Image.fromarray(rng.integers(0, 255, (240, 180, 3), dtype=np.uint8))
        for i in range(args.images)
    }
    phrases = PhraseBank(
        phrases={
            "dress": ["a red dress with short sleeves", "a long dress at a party"],
            "shirt": ["a striped shirt on a hanger", "a man wearing a blue shirt"],
            "dog": ["a dog running on the beach"],
        }
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, batch in (("batched", args.batch_size), ("one_at_a_time", 1)):
            config = OTIConfig(steps=args.steps, batch_size=batch, top_k=3)
            store = Path(tmp) / f"{name}.safetensors"
            start = time.perf_counter()
            report = run_oti(
                clip, list(images), load_image=images.__getitem__, store=store, config=config, phrases=phrases,
                progress=False,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            results[name] = {
                "batch_size": batch,
                "seconds": round(seconds, 3),
                "images_per_s": round(args.images / seconds, 3),
                "first_loss": round(report.first_loss, 4),
                "last_loss": round(report.last_loss, 4),
            }
        _, _, ema_b, _ = TokenStore.read(Path(tmp) / "batched.safetensors")
        _, _, ema_s, _ = TokenStore.read(Path(tmp) / "one_at_a_time.safetensors")
    scratch.cleanup()
    print(
        json.dumps(
            {
                "benchmark": "oti",
                "arch": f"{args.arch} (open_clip, random init)",
                "device": args.device,
                "threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "images": args.images,
                "steps": args.steps,
                **results,
                "speedup": round(
                    results["batched"]["images_per_s"] / results["one_at_a_time"]["images_per_s"], 2
                ),
                "max_token_difference": float((ema_b - ema_s).abs().max()),
            }
        )
    )


if __name__ == "__main__":
    main()
