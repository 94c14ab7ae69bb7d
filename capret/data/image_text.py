"""Image-text pairs for contrastive pretraining (``capret-train`` task ``clip``).

A split is one JSONL file, one pair per line: ``{"image": "images/<file>", "text": "..."}``, the image path
relative to the file's folder (the garment world's ``pretrain/train.jsonl`` / ``val.jsonl``). Other keys are
kept but never read by training. Images are opened lazily by whoever needs the pixels, through
:func:`capret.data.imagefile.decode_image`, so a missing file is reported by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from capret.data.imagefile import path_inside
from capret.errors import DataError, MissingFileError

__all__ = ["ImageTextPair", "read_image_text_pairs"]


@dataclass(frozen=True)
class ImageTextPair:
    """One line of a pretraining split: the image's absolute path and its alt-text."""

    image: Path
    text: str


def read_image_text_pairs(path: str | Path, *, limit: int | None = None) -> list[ImageTextPair]:
    """The pairs of a JSONL split, in file order (the first ``limit`` when given).

    Raises:
        MissingFileError: the file does not exist.
        DataError: a line is not a JSON object with string ``image`` and non-empty string ``text`` (names the
            line), an image path leaves the split's folder, or the file holds no pair.
    """
    file = Path(path)
    if not file.is_file():
        raise MissingFileError("image-text split file does not exist", path=file)
    base = file.parent
    pairs: list[ImageTextPair] = []
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"line {number} is not JSON ({exc.msg})", path=file) from None
            if not isinstance(record, dict):
                raise DataError(f"line {number} is a {type(record).__name__}, not an object", path=file)
            image, text = record.get("image"), record.get("text")
            if not isinstance(image, str) or not image:
                raise DataError(
                    f"line {number}: field 'image' must be a relative path, got {image!r}", path=file
                )
            if not isinstance(text, str) or not text.strip():
                raise DataError(
                    f"line {number}: field 'text' must be a non-empty string, got {text!r}", path=file
                )
            pairs.append(ImageTextPair(path_inside(base, image, where=f"{file}:{number}"), text.strip()))
            if limit is not None and len(pairs) >= limit:
                break
    if not pairs:
        raise DataError("holds no image-text pair", path=file)
    return pairs
