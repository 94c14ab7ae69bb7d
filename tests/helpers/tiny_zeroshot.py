"""Tiny inputs of the zero-shot CIR methods: CLIPs of both families, unlabeled images, phrases, captions.

Import from a test as ``from tiny_zeroshot import ...`` (``tests/helpers`` is on pytest's ``pythonpath``).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from tiny_cir import write_image

#: captions that make "cat", "dog" and "mat" single tokens of the tiny Hugging Face tokenizer
HF_CORPUS = [
    "cat sits on the mat",
    "a cat and a dog",
    "dog runs on the grass",
    "a photo of a red dress that is shorter",
    "a photo of a blue shirt",
    "is darker and has long sleeves",
]


def tiny_hf_clip(directory: Path, *, seed: int = 0) -> Path:
    """A tiny random Hugging Face CLIP whose tokenizer knows the words of :data:`HF_CORPUS`."""
    from capret.testing import save_random_clip

    return save_random_clip(directory, preset="tiny", texts=HF_CORPUS * 20, vocab_size=400, seed=seed)


def tiny_open_clip(directory: Path, *, image_tower: str = "vit", seed: int = 0) -> str:
    """A tiny random open_clip model; returns the ``local-dir:`` name ``load_clip(..., backend="open_clip")`` takes."""
    from capret.testing import save_tiny_open_clip

    return f"local-dir:{save_tiny_open_clip(directory, image_tower=image_tower, seed=seed)}"


def write_image_folder(root: Path, *, n: int = 6) -> Path:
    """``n`` placeholder images in two sub-folders (keys are relative paths)."""
    for i in range(n):
        write_image(root / f"part{i % 2}" / f"img{i:03d}.png", f"unlabeled-{i}")
    return root


def write_shards(root: Path, *, n: int = 6, per_shard: int = 4) -> Path:
    """Webdataset-style tar shards: ``{i:06d}.png`` + ``{i:06d}.txt`` members."""
    root.mkdir(parents=True, exist_ok=True)
    scratch = root / "_scratch.png"
    for shard in range((n + per_shard - 1) // per_shard):
        with tarfile.open(root / f"shard-{shard:05d}.tar", "w") as tar:
            for i in range(shard * per_shard, min(n, (shard + 1) * per_shard)):
                write_image(scratch, f"shard-{i}")
                tar.add(scratch, arcname=f"{i:06d}.png")
                text = f"caption {i}".encode()
                info = tarfile.TarInfo(f"{i:06d}.txt")
                info.size = len(text)
                tar.addfile(info, io.BytesIO(text))
    scratch.unlink()
    return root


def write_phrase_file(path: Path) -> Path:
    phrases = {
        "dog": ["a dog on the grass", "a small dog running"],
        "red dress": ["a photo of a red dress that is shorter"],
        "cat": ["a cat on the mat", "a sleeping cat"],
    }
    path.write_text(json.dumps(phrases))
    return path


def write_caption_store(path: Path, captions: list[str]) -> Path:
    """A caption store (JSONL, the captioning package's record shape) holding ``captions``."""
    lines = [
        json.dumps(
            {
                "key": f"demo/{i}/0",
                "caption": c,
                "dialogue": [],
                "backend": "template",
                "model": {},
                "prompt_version": "v1",
                "created": "2026-01-01T00:00:00Z",
            }  # fmt: skip
        )
        for i, c in enumerate(captions)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
