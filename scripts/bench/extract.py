"""Feature-extraction throughput: ``capret.load_model(...).encode_images`` vs a naive per-image loop.

For a real-size dual-stream model (ViT-B/16 visual stream, MiniLM caption stream; random weights, the speed is
the same) and the tiny one, images are written as JPEG files; the naive loop opens, preprocesses and embeds one
file at a time (``torch.no_grad``, float32) as a user would write it; ``encode_images`` decodes in DataLoader
workers and runs batches under ``inference_mode`` (float32, and bf16 autocast where the device supports it).
Both paths must give the same rows. Prints ONE JSON object; target: batched >= 3x the naive loop on CPU.

    python scripts/bench/extract.py [--images 64] [--batch-size 32] [--skip-real]
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import architectures, bench_parser, machine, parse_bench_args  # noqa: E402
from PIL import Image  # noqa: E402

import capret  # noqa: E402
from capret.models.dual_stream import DualStreamModel, DualStreamModelConfig  # noqa: E402


def _write_images(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        size = (int(rng.integers(200, 320)), int(rng.integers(200, 320)))
        array = rng.integers(0, 255, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        image = Image.fromarray(array).resize(size, Image.Resampling.BILINEAR)
        paths.append(folder / f"{i:05d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def _naive(model: Any, paths: list[Path]) -> np.ndarray:
    rows = []
    with torch.no_grad():
        for path in paths:
            pixels, _ = model.transform(Image.open(path).convert("RGB"))
            rows.append(model.model.encode_image(pixels[None].to(model.device))[0].float().cpu().numpy())
    return np.stack(rows)


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench(
    name: str, config: DualStreamModelConfig, *, images: int, batch_size: int, tmp: Path
) -> dict[str, Any]:
    torch.manual_seed(0)
    folder = DualStreamModel(config).save_pretrained(tmp / name)
    model = capret.load_model(folder)
    paths = _write_images(tmp / "images", images)
    model.encode_images(paths[:batch_size], batch_size=batch_size)  # warm-up (allocator, oneDNN kernels)
    _naive(model, paths[:2])
    naive_s, naive = _timed(lambda: _naive(model, paths))
    fast_s, fast = _timed(lambda: model.encode_images(paths, batch_size=batch_size))
    result: dict[str, Any] = {
        "params_m": round(sum(p.numel() for p in model.model.parameters()) / 1e6, 1),
        "image_size": model.transform.image_size,
        "naive_images_per_s": round(images / naive_s, 2),
        "batched_fp32_images_per_s": round(images / fast_s, 2),
        "speedup_fp32": round(naive_s / fast_s, 2),
        "max_abs_diff_fp32": float(np.abs(fast - naive).max()),
    }
    bf16_ok = model.device.type == "cuda" or torch.backends.mkldnn.is_available()
    if bf16_ok:
        model.encode_images(paths[:batch_size], batch_size=batch_size, precision="bf16")
        bf16_s, bf16 = _timed(lambda: model.encode_images(paths, batch_size=batch_size, precision="bf16"))
        result.update(
            batched_bf16_images_per_s=round(images / bf16_s, 2),
            speedup_bf16=round(naive_s / bf16_s, 2),
            cosine_bf16_vs_fp32_min=float((bf16 * fast).sum(1).min()),
        )
    return result


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--images", type=int, default=64, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=32, help="encode_images batch size")
    args = parse_bench_args(parser)
    out: dict[str, Any] = {
        **machine(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "images": args.images,
        "batch_size": args.batch_size,
        "target": "batched >= 3x naive per-image loop on CPU",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in architectures(skip_real=args.skip_real).items():
            out[name] = bench(name, config, images=args.images, batch_size=args.batch_size, tmp=Path(tmp))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
