"""DeepFashion2: typed items from the official per-image annotation layout.

The official release stores one JSON per image (``<root>/<split>/annos/NNNNNN.json``) next to the photograph
(``<root>/<split>/image/NNNNNN.jpg``); each JSON holds ``source`` (``user``/``shop``), ``pair_id`` and one
``itemN`` object per clothing item (Ge et al., "DeepFashion2", CVPR 2019, Sec. 3). The train split has 390k of
these files, so :func:`load_items` streams them with a progress bar, keeps only the small per-item index by
default (landmarks and polygons are re-read on demand with :func:`load_item_geometry`) and caches the index
next to the annotations.

The retrieval ground truth written by :func:`build_retrieval_ground_truth` is byte-for-byte the record format
of the official ``query_gt.json`` / ``gallery_gt.json`` (github.com/switchablenorms/DeepFashion2,
``evaluation/``), and :func:`to_coco` follows the official ``deepfashion2_to_coco.py`` layout (294 keypoint
slots shared by the 13 categories).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from capret.data.imagefile import decode_image
from capret.errors import ConfigError, DataError, MissingFileError, MissingImageError
from capret.io import atomic_write, cache_dir, read_json

__all__ = [
    "CATEGORIES", "KEYPOINT_COUNTS", "KEYPOINT_OFFSETS", "NUM_KEYPOINT_SLOTS", "Item", "ProtocolSide",
    "build_retrieval_ground_truth", "crop_item", "gt_box_protocol", "image_path", "items_from_ground_truth",
    "iter_items", "load_ground_truth", "load_item_geometry", "load_items", "open_image", "to_coco",
    "write_retrieval_ground_truth",
]  # fmt: skip

#: Official category ids (1-based) and names.
CATEGORIES: dict[int, str] = {
    1: "short sleeve top",
    2: "long sleeve top",
    3: "short sleeve outwear",
    4: "long sleeve outwear",
    5: "vest",
    6: "sling",
    7: "shorts",
    8: "trousers",
    9: "skirt",
    10: "short sleeve dress",
    11: "long sleeve dress",
    12: "vest dress",
    13: "sling dress",
}

#: Landmarks per category (DeepFashion2 paper, Fig. 2); together they fill 294 keypoint slots.
KEYPOINT_COUNTS: dict[int, int] = {
    1: 25, 2: 33, 3: 31, 4: 39, 5: 15, 6: 15, 7: 10, 8: 14, 9: 8, 10: 29, 11: 37, 12: 19, 13: 19,
}  # fmt: skip
#: First slot of each category in the shared 294-slot keypoint vector (official COCO export).
KEYPOINT_OFFSETS: dict[int, int] = {
    cat: sum(KEYPOINT_COUNTS[c] for c in range(1, cat)) for cat in KEYPOINT_COUNTS
}
NUM_KEYPOINT_SLOTS: int = sum(KEYPOINT_COUNTS.values())

SOURCES = ("user", "shop")
_INDEX_VERSION = 2  # 2: signature hashes every file's size and mtime_ns
_ITEM_KEY = re.compile(r"^item(\d+)$")
_ATTRS = ("scale", "occlusion", "zoom_in", "viewpoint")


@dataclass(frozen=True, slots=True)
class Item:
    """One clothing item of one DeepFashion2 image.

    ``(image_id, item_index)`` identifies the item; ``identity`` = ``(pair_id, style)`` is its retrieval
    label (only meaningful when ``style > 0``). ``bbox`` is ``[x1, y1, x2, y2]`` in pixels.
    Landmarks and segmentation may be left empty by the streaming index (they are re-read on demand).
    """

    image_id: int
    item_index: int
    source: str  # "user" (query side) or "shop" (gallery side)
    pair_id: int
    style: int
    category_id: int
    category_name: str
    bbox: tuple[float, float, float, float]
    scale: int = 0
    occlusion: int = 0
    zoom_in: int = 0
    viewpoint: int = 0
    landmarks: tuple[float, ...] = field(default=(), repr=False)
    segmentation: tuple[tuple[float, ...], ...] = field(default=(), repr=False)

    @property
    def key(self) -> str:
        """Caption-store key ``deepfashion2/<image_id>/<item_index>`` (DESIGN.md)."""
        return f"deepfashion2/{self.image_id:06d}/{self.item_index}"

    @property
    def identity(self) -> tuple[int, int]:
        return (self.pair_id, self.style)

    @property
    def has_geometry(self) -> bool:
        """Whether landmarks or polygons were loaded (the cached index leaves both empty)."""
        return bool(self.landmarks) or bool(self.segmentation)


# ----------------------------------------------------------------------------------------------- parsing


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int_field(obj: dict[str, Any], name: str, where: str, path: Path, *, default: int | None = None) -> int:
    if name not in obj:
        if default is not None:
            return default
        raise DataError(f"{path}: missing field '{where}{name}'")
    value = obj[name]
    if not _is_int(value):
        raise DataError(f"{path}: field '{where}{name}' must be an integer, got {value!r}")
    return int(value)


def _numbers(value: Any, *, name: str, path: Path) -> tuple[float, ...]:
    if not isinstance(value, list) or not all(_is_number(v) for v in value):
        raise DataError(f"{path}: field {name!r} must be a list of numbers, got {str(value)[:80]}")
    return tuple(value)


def _parse_geometry(
    raw: dict[str, Any], *, name: str, path: Path
) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    landmarks = _numbers(raw.get("landmarks", []), name=f"{name}.landmarks", path=path)
    if len(landmarks) % 3:
        raise DataError(
            f"{path}: field '{name}.landmarks' must hold [x, y, v] triples, got {len(landmarks)} numbers"
        )
    polygons = raw.get("segmentation", [])
    if not isinstance(polygons, list):
        raise DataError(f"{path}: field '{name}.segmentation' must be a list of polygons, got {polygons!r}")
    segmentation = tuple(
        _numbers(poly, name=f"{name}.segmentation[{i}]", path=path) for i, poly in enumerate(polygons)
    )
    return landmarks, segmentation


def _parse_annotation(path: Path, image_id: int, *, with_geometry: bool) -> list[Item]:
    """Parse one per-image JSON; every malformed field raises ``ValueError`` naming the file and the field."""
    data = read_json(path, what="DeepFashion2 annotation")
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: expected a JSON object with 'source', 'pair_id', 'item1'..., got {data!r:.80}"
        )
    source = data.get("source")
    if source not in SOURCES:
        raise DataError(f"{path}: field 'source' must be one of {SOURCES}, got {source!r}")
    pair_id = _int_field(data, "pair_id", "", path)
    numbered = sorted((int(m.group(1)), key) for key in data if (m := _ITEM_KEY.match(key)))
    items = []
    for index, key in numbered:
        raw = data[key]
        if not isinstance(raw, dict):
            raise DataError(f"{path}: field {key!r} must be an object, got {raw!r:.80}")
        where = f"{key}."
        category_id = _int_field(raw, "category_id", where, path)
        if category_id not in CATEGORIES:
            raise DataError(
                f"{path}: field '{key}.category_id' is {category_id}; valid ids are 1..{len(CATEGORIES)}"
            )
        style = _int_field(raw, "style", where, path)
        if style < 0:
            raise DataError(f"{path}: field '{key}.style' must be >= 0 (0 = not pairable), got {style}")
        box = raw.get("bounding_box")
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise DataError(f"{path}: field '{key}.bounding_box' must be [x1, y1, x2, y2], got {box!r}")
        if box[2] < box[0] or box[3] < box[1]:
            raise DataError(f"{path}: field '{key}.bounding_box' has x2 < x1 or y2 < y1: {box!r}")
        attrs = {name: _int_field(raw, name, where, path, default=0) for name in _ATTRS}
        landmarks: tuple[float, ...] = ()
        segmentation: tuple[tuple[float, ...], ...] = ()
        if with_geometry:
            landmarks, segmentation = _parse_geometry(raw, name=key, path=path)
        items.append(
            Item(
                image_id=image_id,
                item_index=index,
                source=source,
                pair_id=pair_id,
                style=style,
                category_id=category_id,
                category_name=CATEGORIES[category_id],
                bbox=(box[0], box[1], box[2], box[3]),
                landmarks=landmarks,
                segmentation=segmentation,
                **attrs,
            )
        )
    return items


def _annos_dir(root: str | Path, split: str) -> Path:
    annos = Path(root) / split / "annos"
    if not annos.is_dir():
        raise MissingFileError(
            f"DeepFashion2 annotation folder not found: {annos} (expected <root>/<split>/annos/NNNNNN.json)"
        )
    return annos


def _scan(annos: Path) -> tuple[list[tuple[int, Path]], str]:
    """List ``(image_id, path)`` sorted by id, plus the cache signature.

    The signature hashes every annotation file's name, size, ``mtime_ns``, ``ctime_ns`` and inode: a count plus
    the newest mtime missed an annotation edited with its old mtime restored (``cp -p``, ``rsync -a``, ``touch
    -d``). Users can set mtime but not ctime, which the kernel updates on every write or rename, so even a
    same-size edit with the old mtime is seen (at the cost of one rebuild after a dataset is copied).
    """
    files = []
    stats = []
    with os.scandir(annos) as entries:
        for entry in entries:
            if not entry.name.endswith(".json") or not entry.is_file():
                continue
            stem = entry.name[: -len(".json")]
            if not stem.isdigit():
                raise DataError(f"{entry.path}: annotation file names must be NNNNNN.json (the image id)")
            info = entry.stat()
            files.append((int(stem), Path(entry.path)))
            stats.append(
                f"{entry.name}\t{info.st_size}\t{info.st_mtime_ns}\t{info.st_ctime_ns}\t{info.st_ino}"
            )
    files.sort()
    digest = hashlib.sha256("\n".join(sorted(stats)).encode("utf-8")).hexdigest()
    return files, digest


def index_cache_path(annos: Path) -> Path:
    """Where the index of an annotation folder is cached: under the user cache (:func:`capret.io.cache_dir`),
    named by a hash of the folder's absolute path, never inside the dataset root."""
    where = hashlib.sha256(str(annos.resolve()).encode("utf-8")).hexdigest()[:24]
    return cache_dir("deepfashion2_index", f"{where}.npz")


# ----------------------------------------------------------------------------------------------- loading


def iter_items(
    root: str | Path, split: str, *, with_geometry: bool = False, progress: bool = True
) -> Iterator[Item]:
    """Stream the items of a split file by file (sorted by image id), without any cache."""
    files, _ = _scan(_annos_dir(root, split))
    for image_id, path in tqdm(files, desc=f"DeepFashion2 {split}", unit="file", disable=not progress):
        yield from _parse_annotation(path, image_id, with_geometry=with_geometry)


def load_items(
    root: str | Path,
    split: str,
    *,
    with_geometry: bool = False,
    cache: bool = True,
    progress: bool = True,
) -> list[Item]:
    """Load every item of ``<root>/<split>/annos`` sorted by ``(image_id, item_index)``.

    By default only the index fields are kept (no landmarks/polygons: the 390k-image train split then fits in
    a few hundred MB) and the index is cached under the user cache folder (``$CAPRET_CACHE``, default
    ``~/.cache/capret``; see :func:`index_cache_path`); the cache is reused while every annotation file has the
    same name, size, modification and change time (ns) and inode, otherwise rebuilt.
    ``with_geometry=True`` reads landmarks and polygons too and bypasses the cache.
    """
    annos = _annos_dir(root, split)
    if with_geometry or not cache:
        return list(iter_items(root, split, with_geometry=with_geometry, progress=progress))
    files, signature = _scan(annos)
    cache_path = index_cache_path(annos)
    cached = _read_index(cache_path, signature)
    if cached is not None:
        return cached
    items: list[Item] = []
    for image_id, path in tqdm(files, desc=f"DeepFashion2 {split}", unit="file", disable=not progress):
        items.extend(_parse_annotation(path, image_id, with_geometry=False))
    _write_index(cache_path, items, signature)
    return items


def _read_index(path: Path, signature: str) -> list[Item] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) != _INDEX_VERSION or str(data["signature"]) != signature:
                return None
            cols = {name: data[name].tolist() for name in data.files if name not in ("version", "signature")}
    except (OSError, ValueError, KeyError) as exc:
        warnings.warn(f"ignoring unreadable DeepFashion2 index cache {path}: {exc}", stacklevel=3)
        return None
    return [
        Item(
            image_id=cols["image_id"][i],
            item_index=cols["item_index"][i],
            source=SOURCES[cols["source"][i]],
            pair_id=cols["pair_id"][i],
            style=cols["style"][i],
            category_id=cols["category_id"][i],
            category_name=CATEGORIES[cols["category_id"][i]],
            bbox=tuple(cols["bbox"][i]),  # type: ignore[arg-type]
            scale=cols["scale"][i],
            occlusion=cols["occlusion"][i],
            zoom_in=cols["zoom_in"][i],
            viewpoint=cols["viewpoint"][i],
        )
        for i in range(len(cols["image_id"]))
    ]


def _write_index(path: Path, items: Sequence[Item], signature: str) -> None:
    """Write the columnar index atomically; an unwritable cache folder only costs a warning."""
    columns: dict[str, Any] = {
        "version": np.asarray(_INDEX_VERSION),
        "signature": np.asarray(signature),
        "image_id": np.asarray([it.image_id for it in items], dtype=np.int64),
        "item_index": np.asarray([it.item_index for it in items], dtype=np.int32),
        "source": np.asarray([SOURCES.index(it.source) for it in items], dtype=np.int8),
        "pair_id": np.asarray([it.pair_id for it in items], dtype=np.int64),
        "style": np.asarray([it.style for it in items], dtype=np.int32),
        "category_id": np.asarray([it.category_id for it in items], dtype=np.int8),
        "bbox": np.asarray([it.bbox for it in items], dtype=np.float64).reshape(-1, 4),
    }
    for name in _ATTRS:
        columns[name] = np.asarray([getattr(it, name) for it in items], dtype=np.int8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **columns)

    try:
        atomic_write(path, write)
    except OSError as exc:
        warnings.warn(f"could not write DeepFashion2 index cache {path}: {exc}", stacklevel=3)


def load_item_geometry(root: str | Path, split: str, item: Item) -> Item:
    """Return ``item`` with its landmarks and polygons re-read from its annotation file."""
    path = Path(root) / split / "annos" / f"{item.image_id:06d}.json"
    if not path.is_file():
        raise MissingFileError(f"DeepFashion2 annotation not found: {path} (item {item.key})")
    for candidate in _parse_annotation(path, item.image_id, with_geometry=True):
        if candidate.item_index == item.item_index:
            return replace(item, landmarks=candidate.landmarks, segmentation=candidate.segmentation)
    raise DataError(f"{path}: no field 'item{item.item_index}' (item {item.key})")


def image_path(root: str | Path, split: str, image_id: int) -> Path:
    """Path of an image in the official layout ``<root>/<split>/image/NNNNNN.jpg``."""
    return Path(root) / split / "image" / f"{image_id:06d}.jpg"


def open_image(root: str | Path, split: str, image_id: int) -> Image.Image:
    """Open an image as RGB; a missing or undecodable file raises ``BadImageError`` naming the path."""
    return decode_image(image_path(root, split, image_id))


def crop_item(image: Image.Image, bbox: Sequence[float], *, margin: float = 0.0) -> Image.Image:
    """Crop ``bbox`` (xyxy) enlarged by ``margin`` times its width/height on every side, clipped to the image.

    A little context (margin 0.1-0.2) helps re-identification models the same way it helps person re-id;
    the crop is never empty, so degenerate boxes still give a 1x1 image.
    """
    if margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin}")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    width, height = image.size
    left = min(max(0, int(np.floor(x1 - dx))), width - 1)
    top = min(max(0, int(np.floor(y1 - dy))), height - 1)
    right = max(min(width, int(np.ceil(x2 + dx))), left + 1)
    bottom = max(min(height, int(np.ceil(y2 + dy))), top + 1)
    return image.crop((left, top, right, bottom))


# ------------------------------------------------------------------------------------------ ground truth


def _plain_number(value: float) -> int | float:
    """Official files store integral coordinates as JSON integers."""
    return int(value) if float(value).is_integer() else value


def build_retrieval_ground_truth(items: Iterable[Item]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Build ``(query_gt, gallery_gt)`` records exactly as the official validation files.

    Queries are *all* items of user images, style 0 included (15,752 items, 12,550 with style > 0 on
    validation: the official top-k divides by the style > 0 ones); the gallery keeps only shop items with
    style > 0. Records are ordered by image id then item number, with the official key order.
    """
    ordered = sorted(items, key=lambda it: (it.image_id, it.item_index))
    query_gt = [
        {
            "style": it.style,
            "pair_id": it.pair_id,
            "query_image_id": it.image_id,
            "bbox": [_plain_number(v) for v in it.bbox],
            "cls": it.category_id,
        }
        for it in ordered
        if it.source == "user"
    ]
    gallery_gt = [
        {
            "gallery_image_id": it.image_id,
            "style": it.style,
            "pair_id": it.pair_id,
            "bbox": [_plain_number(v) for v in it.bbox],
        }
        for it in ordered
        if it.source == "shop" and it.style > 0
    ]
    return query_gt, gallery_gt


def write_retrieval_ground_truth(
    root: str | Path, split: str = "validation"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write ``<root>/<split>/query_gt.json`` and ``gallery_gt.json`` for a generated dataset in the official
    layout (its annotations already written), as the official validation files; returns the two record lists."""
    items = load_items(root, split, cache=False, progress=False)
    query_gt, gallery_gt = build_retrieval_ground_truth(items)
    (Path(root) / split / "query_gt.json").write_text(json.dumps(query_gt))
    (Path(root) / split / "gallery_gt.json").write_text(json.dumps(gallery_gt))
    return query_gt, gallery_gt


_GT_FIELDS = {
    "query": ("style", "pair_id", "query_image_id", "bbox", "cls"),
    "gallery": ("gallery_image_id", "style", "pair_id", "bbox"),
}


def load_ground_truth(source: str | Path | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Read and validate an official ``query_gt.json``/``gallery_gt.json`` (a path or its parsed list)."""
    name = str(source) if isinstance(source, str | Path) else "<ground-truth list>"
    if isinstance(source, str | Path):
        path = Path(source)
        records = read_json(path, what="DeepFashion2 ground-truth file")
    else:
        records = source
    if not isinstance(records, list):
        raise DataError(f"{name}: expected a list of records, got {type(records).__name__}")
    if not records:
        return []
    kind = "query" if isinstance(records[0], dict) and "query_image_id" in records[0] else "gallery"
    fields = _GT_FIELDS[kind]
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{name}: record {i} must be an object with fields {fields}, got {rec!r:.80}")
        for fld in fields:
            value = rec.get(fld)
            ok = (
                isinstance(value, list) and len(value) == 4 and all(_is_number(v) for v in value)
                if fld == "bbox"
                else _is_int(value)
            )
            if not ok:
                raise DataError(
                    f"{name}: record {i} ({kind}) has a missing or malformed field {fld!r}: {value!r}"
                )
    return records


def items_from_ground_truth(records: list[dict[str, Any]]) -> list[Item]:
    """Turn official GT records back into items (user items for query records, shop items for gallery ones).

    Item numbers are the 1-based order of the record within its image. Gallery records carry no class, so
    their items get ``category_id`` 0 and name ``"unknown"``.
    """
    records = load_ground_truth(records)
    items = []
    per_image: dict[int, int] = {}
    for rec in records:
        query = "query_image_id" in rec
        image_id = rec["query_image_id"] if query else rec["gallery_image_id"]
        per_image[image_id] = per_image.get(image_id, 0) + 1
        category_id = rec["cls"] if query else 0
        items.append(
            Item(
                image_id=image_id,
                item_index=per_image[image_id],
                source="user" if query else "shop",
                pair_id=rec["pair_id"],
                style=rec["style"],
                category_id=category_id,
                category_name=CATEGORIES.get(category_id, "unknown"),
                bbox=tuple(rec["bbox"]),  # type: ignore[arg-type]
            )
        )
    return items


@dataclass(frozen=True)
class ProtocolSide:
    """One side (queries or gallery) of the ground-truth-box retrieval protocol.

    ``labels[i]`` is the integer identity of ``items[i]``; ``identities[label]`` is its ``(pair_id, style)``.
    Both sides share one label table, so equal labels mean the same identity across sides.
    """

    items: list[Item]
    labels: np.ndarray
    identities: tuple[tuple[int, int], ...]


def gt_box_protocol(items: Iterable[Item]) -> tuple[ProtocolSide, ProtocolSide]:
    """Queries (user, style > 0) and gallery (shop, style > 0) items with shared integer identity labels.

    This is the "ground-truth box" variant of consumer-to-shop retrieval: the official protocol ranks
    detections, but with the annotated boxes as detections every query item is localised and only the
    embedding is measured. The identity is ``(pair_id, style)``; category is not part of it.
    """
    ordered = sorted(items, key=lambda it: (it.image_id, it.item_index))
    queries = [it for it in ordered if it.source == "user" and it.style > 0]
    gallery = [it for it in ordered if it.source == "shop" and it.style > 0]
    identities = tuple(sorted({it.identity for it in queries} | {it.identity for it in gallery}))
    label_of = {identity: label for label, identity in enumerate(identities)}

    def side(chosen: list[Item]) -> ProtocolSide:
        labels = np.asarray([label_of[it.identity] for it in chosen], dtype=np.int64)
        return ProtocolSide(items=chosen, labels=labels, identities=identities)

    return side(queries), side(gallery)


# -------------------------------------------------------------------------------------------------- COCO


def _coco_keypoints(item: Item) -> tuple[list[float], int]:
    """Place an item's landmarks at its category's offset in the 294-slot vector (official export)."""
    count = KEYPOINT_COUNTS[item.category_id]
    given = len(item.landmarks) // 3
    if given not in (0, count):
        raise DataError(
            f"item {item.key}: category {item.category_id} ({item.category_name}) has {count} landmarks, "
            f"the annotation gives {given}"
        )
    vector = [0.0] * (3 * NUM_KEYPOINT_SLOTS)
    start = 3 * KEYPOINT_OFFSETS[item.category_id]
    vector[start : start + len(item.landmarks)] = [float(v) for v in item.landmarks]
    visible = sum(1 for v in item.landmarks[2::3] if v > 0)
    return vector, visible


def to_coco(items: Iterable[Item], *, root: str | Path, split: str) -> dict[str, Any]:
    """Export items as a COCO keypoint/instance dataset that ``pycocotools.coco.COCO`` indexes.

    Image sizes are read from the JPEG headers under ``<root>/<split>/image`` (PIL does not decode pixels),
    items loaded without geometry get it re-read from their annotation file, boxes become xywh with
    ``area = w * h`` as in the official converter, and every category lists all 294 keypoint names.
    """
    ordered = sorted(items, key=lambda it: (it.image_id, it.item_index))
    categories = [
        {
            "id": cid,
            "name": name,
            "supercategory": "clothes",
            "keypoints": [str(i) for i in range(1, NUM_KEYPOINT_SLOTS + 1)],
            "skeleton": [],
        }
        for cid, name in CATEGORIES.items()
    ]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for item in ordered:
        if item.category_id not in CATEGORIES:
            raise DataError(f"item {item.key}: category_id {item.category_id} is not one of 1..13")
        if not images or images[-1]["id"] != item.image_id:
            path = image_path(root, split, item.image_id)
            if not path.is_file():
                raise MissingImageError(f"DeepFashion2 image not found: {path} (needed for its size)")
            with Image.open(path) as image:
                width, height = image.size
            images.append(
                {"id": item.image_id, "file_name": path.name, "width": width, "height": height, "license": 0}
            )
        if not item.has_geometry:
            item = load_item_geometry(root, split, item)
        keypoints, visible = _coco_keypoints(item)
        x1, y1, x2, y2 = item.bbox
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": item.image_id,
                "category_id": item.category_id,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0,
                "pair_id": item.pair_id,
                "style": item.style,
                "num_keypoints": visible,
                "keypoints": keypoints,
                "segmentation": [list(poly) for poly in item.segmentation],
            }
        )
    return {
        "info": {},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
