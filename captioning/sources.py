"""What to caption: a dataset name and root become a sorted list of :class:`CaptionTarget`.

Targets are cheap (a key, a way to open the image, the box); images are opened only when their batch is
captioned. The dataset's annotation fields (category, viewpoint, occlusion, scale, zoom) travel in
``CaptionTarget.annotation`` and reach a caption only under the explicit oracle (``--oracle-attributes``); by
default a caption is a function of the pixels and the box alone (DESIGN.md "No oracle by default"), and the
category comes from a model (``CaptionTarget.category`` set by a detector, or the runner's category model).

Keys follow DESIGN.md (``<dataset>/<image_id>/<item_index>``) and are the
ones the training code joins on: DeepFashion2 and the quickstart's demo dataset (same layout) use
``Item.key``; FashionIQ/CIRR/CIRCO reference images use their dataset class's ``images_to_caption()``
keys; ``images`` captions every image file under a folder (key ``images/<relative path>/0``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from capret.data.imagefile import decode_image
from capret.errors import DataError, MissingFileError, UsageError
from capret.registry import Registry

__all__ = [
    "CaptionTarget",
    "create_source",
    "default_split",
    "list_sources",
    "parse_shard",
    "register_source",
    "select_shard",
    "store_binding",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def open_rgb(path: Path) -> Image.Image:
    """Open an image file as RGB; a missing or undecodable file raises ``BadImageError`` naming it."""
    return decode_image(path)


@dataclass(frozen=True)
class CaptionTarget:
    """One thing to caption: its store key, how to open its image, its box, and (oracle only) its annotation.

    ``category`` is a *predicted* category (a detector's class) and may be used by default; ``annotation``
    holds the dataset's fields (``category_name``, ``category_id``, ``viewpoint``, ...) and is read only when
    the caller asks for the oracle.
    """

    key: str
    open_image: Callable[[], Image.Image] = field(repr=False, compare=False)
    bbox: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2; None = the whole image
    category: str = ""  # predicted by a model (detector), never copied from the annotation
    annotation: dict[str, Any] = field(default_factory=dict, compare=False)  # oracle only


SourceFactory = Callable[..., list[CaptionTarget]]
_SOURCES: Registry[list[CaptionTarget]] = Registry("caption dataset")


def register_source(name: str) -> Callable[[SourceFactory], SourceFactory]:
    """Decorator registering ``fn(root, split, *, category, progress) -> list[CaptionTarget]`` under ``name``
    (``progress``: whether a long index load may show a bar)."""
    return _SOURCES.register(name)


def create_source(
    name: str, *, root: str | Path, split: str | None, category: str | None = None, progress: bool = True
) -> list[CaptionTarget]:
    """The targets of dataset ``name`` (sorted by key); unknown names list the valid ones.

    ``progress=False`` silences the bar of a long annotation load (DeepFashion2's index).
    """
    root = Path(root)
    if not root.exists():
        raise MissingFileError(f"dataset root {root} does not exist")
    targets = _SOURCES.get(name)(root, split, category=category, progress=progress)
    keys = [t.key for t in targets]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise DataError(f"dataset {name!r} at {root} yields key {duplicate!r} more than once")
    return sorted(targets, key=lambda t: t.key)


def default_split(name: str) -> str:
    """The split a source reads when none is given (recorded in the caption store's binding)."""
    return {"deepfashion2": "validation", "demo": "validation", "images": ""}.get(name, "val")


def store_binding(name: str, split: str | None, targets: Sequence[CaptionTarget]) -> dict[str, str]:
    """What a caption store written from ``targets`` describes: dataset, split and the fingerprint of every
    target of the split (pass them *before* sharding, so that every shard carries the same value)."""
    from capret.data.caption_records import items_fingerprint

    return {
        "dataset": name,
        "split": split or default_split(name),
        "fingerprint": items_fingerprint((t.key, t.bbox) for t in targets),
    }


def list_sources() -> list[str]:
    return _SOURCES.names()


# --- sharding ---------------------------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: need 0 <= i < n")
    return index, count


def shard_of(key: str, count: int) -> int:
    """Stable shard of a key (SHA-1, not Python's per-process salted ``hash``), independent of the other keys,
    so adding images to a dataset never moves already-assigned keys between shards."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % count


def select_shard(targets: Sequence[CaptionTarget], index: int, count: int) -> list[CaptionTarget]:
    return [t for t in targets if shard_of(t.key, count) == index]


# --- built-in sources -----------------------------------------------------------------------------------


def _deepfashion2(
    root: Path, split: str | None, *, category: str | None, progress: bool
) -> list[CaptionTarget]:
    from capret.data.deepfashion2 import load_items, open_image

    if category is not None:
        raise UsageError("--category applies to fashioniq only")
    split = split or "validation"
    targets = []
    for item in load_items(root, split, progress=progress):
        annotation: dict[str, Any] = {
            "category_name": item.category_name,
            "category_id": item.category_id,
            "source": item.source,
            "identity": [item.pair_id, item.style],
            "viewpoint": item.viewpoint,
            "occlusion": item.occlusion,
            "zoom_in": item.zoom_in,
            "scale": item.scale,
        }
        targets.append(
            CaptionTarget(
                key=item.key,
                open_image=partial(open_image, root, split, item.image_id),
                bbox=tuple(float(v) for v in item.bbox),  # type: ignore[arg-type]
                annotation=annotation,
            )
        )
    return targets


register_source("deepfashion2")(_deepfashion2)
# The quickstart's demo dataset has the DeepFashion2 layout and keys, so training joins captions by Item.key.
register_source("demo")(_deepfashion2)


def _reference_images(pairs: Sequence[tuple[str, Path]], category: str = "") -> list[CaptionTarget]:
    annotation = {"category_name": category} if category else {}
    return [
        CaptionTarget(key=key, open_image=partial(open_rgb, Path(path)), annotation=dict(annotation))
        for key, path in pairs
    ]


@register_source("fashioniq")
def _fashioniq(root: Path, split: str | None, *, category: str | None, progress: bool) -> list[CaptionTarget]:
    from capret.data import fashioniq

    categories = [category] if category else list(fashioniq.CATEGORIES)
    targets: dict[str, CaptionTarget] = {}
    names = {"dress": "dress", "shirt": "shirt", "toptee": "top"}
    for name in categories:
        dataset = fashioniq.FashionIQ(root, name, split or "val")
        for target in _reference_images(dataset.images_to_caption(), names.get(name, name)):
            targets.setdefault(target.key, target)  # an asin may be a reference in two categories
    return list(targets.values())


@register_source("cirr")
def _cirr(root: Path, split: str | None, *, category: str | None, progress: bool) -> list[CaptionTarget]:
    from capret.data.cirr import CIRR

    return _reference_images(CIRR(root, split or "val").images_to_caption())


@register_source("circo")
def _circo(root: Path, split: str | None, *, category: str | None, progress: bool) -> list[CaptionTarget]:
    from capret.data.circo import CIRCO

    return _reference_images(CIRCO(root, split or "val").images_to_caption())


@register_source("images")
def _images(root: Path, split: str | None, *, category: str | None, progress: bool) -> list[CaptionTarget]:
    """Every image under ``root`` (recursively; ``split`` names a sub-folder), whole image, key
    ``images/<relative path without suffix>/0``."""
    base = root / split if split else root
    if not base.is_dir():
        raise MissingFileError(f"image folder {base} does not exist")
    paths = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [
        CaptionTarget(
            key=f"images/{p.relative_to(base).with_suffix('').as_posix()}/0",
            open_image=partial(open_rgb, p),
            annotation={"category_name": category} if category else {},
        )
        for p in paths
    ]
