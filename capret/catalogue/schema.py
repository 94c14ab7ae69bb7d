"""What a catalogue row holds, the catalogue's settings, and the hashes that identify images and models.

A row is one item (one detected garment of one source photo)::

    id               stable relative name "<image path relative to the root, no suffix>/<item n>" (never absolute)
    image            the source photo, relative to the catalogue's declared root (POSIX separators)
    image_sha256     SHA-256 of the source file's bytes: exact duplicates are the same bytes
    phash            64-bit difference hash (dHash) of the photo, stored as a signed int64
    item             the item's number within its photo (detections ordered best first)
    box              [x1, y1, x2, y2] in pixels of the source photo
    score            the detector's score (1.0 for the whole image or a box given by the user)
    category         category name (given when added, else the detector's DeepFashion2 category, else null)
    caption          the caption the embedding was computed with (null: image-only)
    caption_source   who wrote it: the caption backend's name ("template", "openai", ...), "manual", or "none"
    vector           the dual-stream embedding, L2-normalised float32 [dim]
    model_fingerprint  which model computed ``vector`` (see :func:`model_fingerprint`)
    created, updated   UTC timestamps

**Near duplicates.** The perceptual hash is the 64-bit dHash of the photo (grey 9x8 thumbnail, one bit per
horizontally adjacent pair: is the left pixel brighter). Two photos whose hashes differ in at most
:data:`NEAR_DUPLICATE_BITS` = 8 of the 64 bits are reported as near duplicates: in the tests a JPEG re-encode at
quality 60 and a resize to half size stay within 2 bits, while different photos of the demo set are 20 or more
apart. A near duplicate is still added (a re-photographed item is a new row); exact duplicates (same bytes) are
skipped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from capret.errors import CheckpointError, DataError
from capret.io import file_sha256, resolve_model_folder

__all__ = [
    "ITEMS_TABLE",
    "NEAR_DUPLICATE_BITS",
    "SETTINGS_TABLE",
    "CatalogueSettings",
    "dhash",
    "hamming",
    "item_id",
    "model_fingerprint",
    "row_schema",
]

ITEMS_TABLE = "items"
SETTINGS_TABLE = "settings"
#: hashes at most this many bits apart (of 64) are near duplicates (see the module docstring)
NEAR_DUPLICATE_BITS = 8
#: settings format version (a catalogue written by a newer version is refused, not misread)
SETTINGS_VERSION = 1


@dataclass
class CatalogueSettings:
    """What a catalogue was made with; stored in the catalogue itself (its ``settings`` table)."""

    model: str  # the dual-stream model folder that embeds rows (absolute path)
    fingerprint: str  # model_fingerprint(model): rows of any other model are refused
    dim: int  # embedding width
    root: str  # declared root of the source photos; rows store paths relative to it
    detector: dict[str, Any] | None = (
        None  # {"name", "options"} of capret.inference.detectors; None = whole photo
    )
    captioner: dict[str, Any] | None = None  # CaptionerSettings as a dict; None = image-only embeddings
    max_items: int = 5  # most items (detections) kept per photo
    index_threshold: int = 100_000  # rows from which `optimize` builds IVF-PQ; below it search is exact
    nprobes: int = 48  # IVF partitions probed per query (IVF-PQ only)
    refine_factor: int = 100  # candidates re-scored with full vectors: k * refine_factor (IVF-PQ only)
    near_duplicate_bits: int = NEAR_DUPLICATE_BITS
    index_trained_rows: int = 0  # rows the IVF-PQ was trained on (0 = no index): grown 2x means stale
    version: int = SETTINGS_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (who created it, when)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, where: str) -> CatalogueSettings:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"catalogue settings are not valid JSON ({exc})", path=where) from None
        if not isinstance(data, dict):
            raise DataError("catalogue settings are not a JSON object", path=where)
        if int(data.get("version", 0)) > SETTINGS_VERSION:
            raise DataError(
                f"catalogue settings version {data.get('version')} is newer than this capret reads "
                f"({SETTINGS_VERSION}); upgrade capret",
                path=where,
            )
        valid = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - valid)
        if unknown:
            raise DataError(f"unknown catalogue setting(s) {unknown}; valid: {sorted(valid)}", path=where)
        return cls(**data)


def row_schema(dim: int) -> pa.Schema:
    """The items table's Arrow schema for ``dim``-wide embeddings."""
    stamp = pa.timestamp("us", tz="UTC")
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("image", pa.string(), nullable=False),
            pa.field("image_sha256", pa.string(), nullable=False),
            pa.field("phash", pa.int64(), nullable=False),
            pa.field("item", pa.int32(), nullable=False),
            pa.field("box", pa.list_(pa.float32(), 4), nullable=False),
            pa.field("score", pa.float32(), nullable=False),
            pa.field("category", pa.string()),
            pa.field("caption", pa.string()),
            pa.field("caption_source", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), int(dim)), nullable=False),
            pa.field("model_fingerprint", pa.string(), nullable=False),
            pa.field("created", stamp, nullable=False),
            pa.field("updated", stamp, nullable=False),
        ]
    )


def dhash(image: Image.Image) -> int:
    """64-bit difference hash of a photo as a signed int64 (the bit pattern of the unsigned hash).

    Grey 9x8 thumbnail (box filter, so resizing the source barely moves it), one bit per horizontally adjacent
    pair; robust to re-encoding, resizing and small colour shifts, not to crops or flips (those are new photos).
    """
    grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).reshape(-1)
    value = 0
    for bit in bits.tolist():
        value = (value << 1) | int(bit)
    return int(np.array([value], dtype=np.uint64).view(np.int64)[0])


def hamming(a: int, others: np.ndarray) -> np.ndarray:
    """Bits differing between hash ``a`` and each of ``others`` (int64 array), vectorised."""
    x = np.bitwise_xor(np.asarray(others, dtype=np.int64), np.int64(a)).view(np.uint64)
    count = np.zeros(x.shape, dtype=np.int64)
    for shift in range(0, 64, 8):  # byte-wise popcount through a 256-entry table
        count += _POPCOUNT[((x >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.intp)]
    return count


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def item_id(relative_image: str, item: int) -> str:
    """The stable id of item ``item`` of the photo at ``relative_image`` (relative POSIX path).

    The suffix is dropped and every character outside letters, digits, ``_ - .`` becomes ``_``, so ids are safe
    in URLs and filter expressions (``capret serve`` addresses items by id).
    """
    stem = relative_image.rsplit(".", 1)[0] if "." in Path(relative_image).name else relative_image
    parts = []
    for part in stem.split("/"):
        clean = "".join(c if c.isalnum() or c in "_-." else "_" for c in part).lstrip(".") or "_"
        parts.append(clean)
    return "/".join(parts) + f"/{int(item)}"


def model_fingerprint(path: str | Path) -> str:
    """A short hash that changes whenever the model's weights or config change.

    For an exported model folder it is the hash of ``capret_model.json``, which holds the config and the weights'
    SHA-256 (checked on load); for a training checkpoint, of its sidecar plus its weights file.
    """
    from capret.models.dual_stream import MODEL_CONFIG_FILE

    try:
        folder = resolve_model_folder(path, markers=(MODEL_CONFIG_FILE, "checkpoint.json"))
    except FileNotFoundError as exc:
        raise CheckpointError(str(exc), path=path) from None
    digest = hashlib.sha256()
    if (folder / MODEL_CONFIG_FILE).is_file():
        digest.update((folder / MODEL_CONFIG_FILE).read_bytes())
    else:
        digest.update((folder / "checkpoint.json").read_bytes())
        for weights in sorted(folder.glob("*.safetensors")):
            digest.update(file_sha256(weights).encode())
    return digest.hexdigest()[:16]
