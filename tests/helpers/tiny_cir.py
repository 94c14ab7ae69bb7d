"""Tiny CLIP checkpoints and tiny CIR datasets (FashionIQ, CIRR, CIRCO layouts) for tests.

The annotation records are real ones, a small subset taken from ``../shared/data`` so the files have the
official structure; the images are small placeholder pictures (a flat colour per image plus noise, with
varied aspect ratios so target padding is exercised) written only for the images those records name.
Import from a test as ``from tiny_cir import ...`` (``tests/helpers`` is on pytest's ``pythonpath``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image
from repo_paths import SHARED_DATA  # noqa: E402


def make_tiny_clip(directory: str | Path, *, texts: list[str] | None = None, seed: int = 0) -> Path:
    """A tiny random CLIP + trained tokenizer + image processor in ``from_pretrained`` layout."""
    from capret.testing import save_random_clip

    corpus = texts or [
        "is shiny and silver with shorter sleeves",
        "fit and flare",
        "is darker and has long sleeves",
        "show three bottles of soft drink",
        "shows two people and has a more colorful background",
    ]
    return save_random_clip(directory, preset="tiny", texts=corpus * 4, vocab_size=400, seed=seed)


def _colour(name: str) -> tuple[int, int, int]:
    digest = hashlib.md5(name.encode()).digest()
    return digest[0], digest[1], digest[2]


def write_image(path: Path, name: str, *, size: tuple[int, int] | None = None) -> None:
    """A placeholder picture whose colour and aspect ratio are fixed by ``name``."""
    digest = hashlib.md5(name.encode()).digest()
    w, h = size or (24 + digest[3] % 24, 24 + digest[4] % 24)
    rng = np.random.default_rng(int.from_bytes(digest[:4], "little"))
    pixels = np.clip(np.array(_colour(name)) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_fashioniq(
    root: str | Path, *, categories: tuple[str, ...] = ("dress", "shirt"), n: int = 8, extra: int = 44
) -> Path:
    """FashionIQ layout with ``n`` real val triplets per category, used as train, val and (target-less) test.

    ``extra`` real gallery asins are added so the gallery holds more than 50 images (R@50 needs 50 ranked).
    """
    root = Path(root)
    for category in categories:
        records = json.loads(
            (SHARED_DATA / "fashioniq" / "captions" / f"cap.{category}.val.json").read_text()
        )
        split = json.loads(
            (SHARED_DATA / "fashioniq" / "image_splits" / f"split.{category}.val.json").read_text()
        )
        chosen = records[:n]
        gallery = list(dict.fromkeys([r[k] for r in chosen for k in ("candidate", "target")]))
        gallery += [a for a in split if a not in gallery][:extra]
        test = [{"candidate": r["candidate"], "captions": r["captions"]} for r in chosen]
        for split_name, caps in (("train", chosen), ("val", chosen), ("test", test)):
            _dump(root / "captions" / f"cap.{category}.{split_name}.json", caps)
            _dump(root / "image_splits" / f"split.{category}.{split_name}.json", gallery)
        for asin in gallery:
            write_image(root / "images" / f"{asin}.png", asin)
    return root


def write_cirr(root: str | Path, *, n: int = 10, extra: int = 40) -> Path:
    """CIRR layout (``root/cirr/captions``, ``root/cirr/image_splits``, ``root/dev``) from ``n`` real triplets.

    The same triplets serve as train, val and test1 (test1 without targets, as the official test file);
    ``extra`` other real val images join the split so the gallery exceeds the 51 images R@50 needs.
    """
    root = Path(root)
    records = json.loads((SHARED_DATA / "cirr" / "captions" / "cap.rc2.val.json").read_text())[:n]
    names = list(
        dict.fromkeys(
            [r["reference"] for r in records]
            + [r["target_hard"] for r in records]
            + [m for r in records for m in r["img_set"]["members"]]
        )
    )
    split = json.loads((SHARED_DATA / "cirr" / "image_splits" / "split.rc2.val.json").read_text())
    names += [name for name in split if name not in names][:extra]
    paths = {name: f"./dev/{name}.png" for name in names}
    test = [{k: v for k, v in r.items() if k not in ("target_hard", "target_soft")} for r in records]
    for split_name, caps in (("train", records), ("val", records), ("test1", test)):
        _dump(root / "cirr" / "captions" / f"cap.rc2.{split_name}.json", caps)
        _dump(root / "cirr" / "image_splits" / f"split.rc2.{split_name}.json", paths)
    for name in names:
        write_image(root / "dev" / f"{name}.png", name)
    return root


def write_circo(root: str | Path, *, n: int = 6, extra: int = 40) -> tuple[Path, list[int]]:
    """CIRCO layout with ``n`` real val queries; the gallery is only the image folder (no image-info file).

    Returns the root and the gallery ids (references, every ground truth and ``extra`` distractors).
    """
    root = Path(root)
    records = json.loads((SHARED_DATA / "circo" / "annotations" / "val.json").read_text())[:n]
    ids = list(
        dict.fromkeys(
            [r["reference_img_id"] for r in records] + [g for r in records for g in r["gt_img_ids"]]
        )
    )
    ids += [900000 + i for i in range(extra)]
    test = [
        {k: r[k] for k in ("id", "reference_img_id", "relative_caption", "shared_concept")} for r in records
    ]
    _dump(root / "annotations" / "val.json", records)
    _dump(root / "annotations" / "test.json", test)
    for image_id in ids:
        write_image(root / "COCO2017_unlabeled" / "unlabeled2017" / f"{image_id:012d}.jpg", str(image_id))
    return root, ids
