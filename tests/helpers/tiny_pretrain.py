"""A tiny image-text pretraining split in the garment world's layout, and a tiny ``clip`` task config.

``DIR/images/*.png`` + ``DIR/train.jsonl`` / ``DIR/val.jsonl``, lines ``{"image": "images/<file>", "text": ...}``.
Each image is a coloured shape on a grey ground and its text names both ("a red square"), so the signal is in
the pixels and a contrastive model can learn it. Import as ``from tiny_pretrain import ...``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle", "stripe")


def shape_image(colour: str, shape: str, *, size: int = 40, seed: int = 0) -> Image.Image:
    """A ``colour`` ``shape`` on a grey ground, placed with a little seeded jitter."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(2, 8, size=2))
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle((x, y, x + 28, y + 28), fill=fill)
    elif shape == "circle":
        draw.ellipse((x, y, x + 28, y + 28), fill=fill)
    else:
        for k in range(0, 30, 8):
            draw.rectangle((x, y + k, x + 30, y + k + 3), fill=fill)
    return image


def write_pretrain_split(root: Path, *, train: int = 48, val: int = 12, seed: int = 0) -> Path:
    """Write the split; returns ``root``. Pair ``i`` has colour ``i % 4`` and shape ``(i // 4) % 3``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for split, count, offset in (("train", train, 0), ("val", val, train)):
        lines = []
        for i in range(offset, offset + count):
            colour, shape = names[i % len(names)], SHAPES[(i // len(names)) % len(SHAPES)]
            file = f"images/{split}_{i:04d}.png"
            shape_image(colour, shape, seed=seed * 7919 + i).save(root / file)
            lines.append(json.dumps({"image": file, "text": f"a {colour} {shape}"}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def tiny_clip_overrides(root: Path, out: Path, *, steps: int = 3) -> list[str]:
    """``key=value`` overrides of a few-step ``clip`` run of a very small architecture on :func:`write_pretrain_split`."""
    return [
        f"data.root={root}", "data.batch_size=8", "data.encode_batch_size=16",
        "model.arch.embed_dim=16", "model.arch.vision.image_size=32", "model.arch.vision.width=32",
        "model.arch.vision.layers=1", "model.arch.vision.head_width=16", "model.arch.vision.patch_size=8",
        "model.arch.text.context_length=12", "model.arch.text.width=32", "model.arch.text.heads=2",
        "model.arch.text.layers=1",
        f"trainer.output_dir={out}", f"trainer.max_steps={steps}", "trainer.warmup_steps=1",
        "trainer.progress=false", "trainer.tensorboard=false", "trainer.amp=off", "trainer.log_every=1",
        f"trainer.eval_every={steps}",
    ]  # fmt: skip


def tiny_clip_config(root: Path, out: Path, *, steps: int = 3, extra: list[str] | None = None) -> Any:
    """The :class:`capret.tasks.clip.ClipTaskConfig` of :func:`tiny_clip_overrides` (plus ``extra``)."""
    from capret.config import load_config
    from capret.tasks.clip import ClipTaskConfig

    return load_config(ClipTaskConfig, None, [*tiny_clip_overrides(root, out, steps=steps), *(extra or [])])
