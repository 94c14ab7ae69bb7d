"""CIRCO (Baldrati et al., ICCV 2023) composed-retrieval queries from the official annotation files.

Layout of ``root`` as the official repository (github.com/miccunifi/CIRCO) documents it::

    root/annotations/<split>.json     [{"id", "reference_img_id", "target_img_id", "relative_caption",
                                        "shared_concept", "gt_img_ids", "semantic_aspects"}, ...]
    root/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json   (the gallery: "images"[*]["id"])
    root/COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg

Images are named by their integer COCO id. CIRCO is the first CIR benchmark with several ground truths per
query (``gt_img_ids``, the first being ``target_img_id``), scored with mAP@K. The test split carries neither
(``target=None``, ``gt_ids=()``).

The gallery is the COCO 2017 unlabeled set (123,403 images), which is large and often replaced by a subset in
experiments, so it is explicit: ``gallery_ids=`` takes a list of ids or a file (the COCO image-info JSON, a
JSON list of ids, or a text file with one id per line); without it the COCO image-info file under ``root``
is used when present.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capret.data.cir_split import CIRSplit
from capret.data.fashioniq import json_records, load_json
from capret.errors import ConfigError, DataError, MissingFileError

__all__ = ["SPLITS", "CIRCO", "CIRCOQuery", "read_gallery_ids"]

SPLITS: tuple[str, ...] = ("val", "test")
IMAGE_INFO = Path("COCO2017_unlabeled") / "annotations" / "image_info_unlabeled2017.json"
IMAGE_FOLDER = Path("COCO2017_unlabeled") / "unlabeled2017"


@dataclass(frozen=True)
class CIRCOQuery:
    """One CIRCO query: reference image id, relative caption, target id and every ground-truth id."""

    query_id: int
    reference: int
    caption: str
    shared_concept: str
    target: int | None
    gt_ids: tuple[int, ...]
    semantic_aspects: tuple[str, ...]


def read_gallery_ids(path: Path | str) -> list[int]:
    """Read gallery image ids from a COCO image-info JSON, a JSON list of ids, or a text file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"CIRCO gallery file not found: {path}")
    if path.suffix.lower() == ".json":
        data = load_json(path)
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            try:
                return [int(image["id"]) for image in data["images"]]
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(f"{path}: every entry of 'images' needs an integer 'id' ({err})") from err
        if isinstance(data, list):
            try:
                return [int(x) for x in data]
            except (TypeError, ValueError) as err:
                raise DataError(f"{path}: expected a JSON list of integer image ids ({err})") from err
        raise DataError(f"{path}: expected a COCO image-info object with 'images' or a JSON list of ids")
    ids = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            ids.append(int(Path(line).stem))
        except ValueError:
            raise DataError(f"{path}:{number}: expected an integer image id, got {line!r}") from None
    return ids


class CIRCO(CIRSplit[CIRCOQuery]):
    """The queries of one CIRCO split; ``len()`` is the number of queries.

    Args:
        root: dataset folder (see the module docstring).
        split: ``val`` or ``test``.
        gallery_ids: the gallery image ids, or a file listing them (see ``read_gallery_ids``); default the
            COCO image-info file under ``root`` if it exists.
        image_dir: folder of ``<12-digit id>.jpg`` (default ``root/COCO2017_unlabeled/unlabeled2017``).
    """

    name = "circo"

    def __init__(
        self,
        root: Path | str,
        split: str,
        *,
        gallery_ids: Sequence[int] | Path | str | None = None,
        image_dir: Path | str | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f"unknown CIRCO split {split!r}; valid: {', '.join(SPLITS)}")
        self.root = Path(root)
        self.split = split
        self.image_dir = Path(image_dir) if image_dir is not None else self.root / IMAGE_FOLDER
        official = self.root / "annotations" / f"{split}.json"
        flat = self.root / f"{split}.json"
        if not official.is_file() and not flat.is_file():
            raise MissingFileError(
                f"CIRCO {split}: {official.name} not found in {official.parent} or {self.root}"
            )
        self.annotations_file = official if official.is_file() else flat
        self.annotations: list[dict[str, Any]] = load_json(self.annotations_file)
        self.queries = self._parse(self.annotations)
        self._gallery: list[int] | None
        if gallery_ids is None:
            info = self.root / IMAGE_INFO
            self._gallery = read_gallery_ids(info) if info.is_file() else None
        elif isinstance(gallery_ids, (str, Path)):
            self._gallery = read_gallery_ids(gallery_ids)
        else:
            self._gallery = [int(i) for i in gallery_ids]

    @property
    def gallery(self) -> list[int]:
        """Gallery image ids (COCO ids); an error if none were given and no image-info file exists."""
        if self._gallery is None:
            raise MissingFileError(
                f"CIRCO gallery unknown: pass gallery_ids= (ids or a file) or place {self.root / IMAGE_INFO}"
            )
        return self._gallery

    def _parse(self, records: Any) -> list[CIRCOQuery]:
        queries = []
        fields = ("id", "reference_img_id", "relative_caption")
        for _, where, record in json_records(
            records, path=self.annotations_file, what="queries", fields=fields
        ):
            target = record.get("target_img_id")
            gt_ids = tuple(int(i) for i in record.get("gt_img_ids") or ())
            if self.split == "val":
                if target is None or not gt_ids:
                    raise DataError(
                        f"{where} (id {record['id']}): val queries need 'target_img_id' and 'gt_img_ids'"
                    )
                if gt_ids[0] != int(target):
                    raise DataError(
                        f"{where} (id {record['id']}): 'gt_img_ids'[0]={gt_ids[0]} differs from "
                        f"'target_img_id'={target}"
                    )
            queries.append(
                CIRCOQuery(
                    query_id=int(record["id"]),
                    reference=int(record["reference_img_id"]),
                    caption=str(record["relative_caption"]),
                    shared_concept=str(record.get("shared_concept", "")),
                    target=None if target is None else int(target),
                    gt_ids=gt_ids,
                    semantic_aspects=tuple(record.get("semantic_aspects") or ()),
                )
            )
        return queries

    def image_path(self, name: int | str) -> Path:
        """Path ``<image_dir>/<12-digit id>.jpg`` of COCO image ``name`` (an int id or its digits)."""
        try:
            image_id = int(name)
        except (TypeError, ValueError):
            raise DataError(f"CIRCO image names are integer COCO ids, got {name!r}") from None
        return self.image_dir / f"{image_id:012d}.jpg"
