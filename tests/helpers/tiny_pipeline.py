"""A tiny query pipeline folder (random tiny dual-stream model, 9 shop photos, template captions) for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tiny_text import save_tiny_dual_stream

from capret.cli.main import main
from capret.inference.query.pipeline import PipelineConfig


def write_shop_photos(folder: Path, *, count: int = 9, seed: int = 0) -> Path:
    """``count`` small photos with a coloured 'garment' each, named like DeepFashion2 images."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 255, size=(36 + 2 * i, 44, 3), dtype=np.uint8)
        pixels[5:25, 5:30] = (40 * i % 255, 200, 30)
        Image.fromarray(pixels).save(folder / f"{i + 1:06d}.png")
    return folder


def build_tiny_pipeline(root: Path, *, reranker: str | None = "aqe") -> Path:
    """``root/pipeline`` naming a tiny model, a gallery index of ``root/shop`` and the template captioner."""
    save_tiny_dual_stream(root / "model", pad="squarepad")
    shop = write_shop_photos(root / "shop")
    argv = ["index", "build", "--checkpoint", str(root / "model"), "--images", str(shop)]
    code = main([*argv, "--out", str(root / "gallery"), "--captions", "template", "--no-progress"])
    if code != 0:
        raise RuntimeError(f"capret index build failed with exit code {code}")
    PipelineConfig(
        model="../model",
        gallery="../gallery",
        captioner={"backend": "template"},
        reranker=None if reranker is None else {"name": reranker, "options": {"k": 2}, "topk": 5},
    ).save(root / "pipeline")
    return root / "pipeline"
