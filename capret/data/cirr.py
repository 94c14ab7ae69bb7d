"""CIRR (Liu et al., ICCV 2021) composed-retrieval triplets from the official annotation files.

Layout of ``root`` as the official repository (github.com/Cuberick-Orion/CIRR) documents it::

    root/captions/cap.rc2.<split>.json        [{"pairid", "reference", "caption", "target_hard",
                                                "target_soft", "img_set": {"id", "members", ...}}, ...]
    root/image_splits/split.rc2.<split>.json  {name: "./dev/<name>.png", ...}   (every image of the split)
    root/dev/, root/train/<n>/, root/test1/   the images, at the split file's relative paths

The annotation folders may also sit in ``root/cirr/`` (the layout of the CIRR README and of CLIP4Cir, images
still relative to ``root``) or directly in ``root`` (flat). Splits are ``train``, ``val`` and ``test1``
(``test`` is accepted for ``test1``); test triplets carry no target (``target=None``).

The evaluation gallery is the whole split (``.gallery``), with the reference removed from each ranking; the
``img_set.members`` (six visually similar images) give Recall_subset (CIRR paper, section 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capret.data.cir_split import CIRSplit
from capret.data.fashioniq import json_records, load_json
from capret.data.imagefile import path_inside
from capret.errors import ConfigError, DataError, MissingFileError, MissingKeyError

__all__ = ["SPLITS", "CIRR", "CIRRTriplet"]

SPLITS: tuple[str, ...] = ("train", "val", "test1")
_ALIASES = {"test": "test1", "dev": "val"}


@dataclass(frozen=True)
class CIRRTriplet:
    """One CIRR query. ``query_id`` is the official ``pairid``; ``members`` the ``img_set`` subset."""

    query_id: int
    reference: str
    caption: str
    target: str | None
    members: tuple[str, ...]
    set_id: int
    target_soft: dict[str, float] | None

    @property
    def pairid(self) -> int:
        return self.query_id


class CIRR(CIRSplit[CIRRTriplet]):
    """The triplets of one CIRR split; ``len()`` is the number of queries.

    Args:
        root: dataset folder (see the module docstring).
        split: ``train``, ``val`` or ``test1`` (alias ``test``).
        image_dir: folder the split file's relative paths start from (default ``root``).
    """

    name = "cirr"

    def __init__(self, root: Path | str, split: str, *, image_dir: Path | str | None = None) -> None:
        split = _ALIASES.get(split, split)
        if split not in SPLITS:
            raise ConfigError(f"unknown CIRR split {split!r}; valid: {', '.join(SPLITS)} (or 'test')")
        self.root = Path(root)
        self.split = split
        self.image_dir = Path(image_dir) if image_dir is not None else self.root
        self.captions_file = self._find(f"cap.rc2.{split}.json", "captions")
        self.split_file = self._find(f"split.rc2.{split}.json", "image_splits")
        self.annotations: list[dict[str, Any]] = load_json(self.captions_file)
        self.queries = self._parse(self.annotations)
        paths = load_json(self.split_file)
        if not isinstance(paths, dict) or not all(isinstance(v, str) for v in paths.values()):
            raise DataError(f"{self.split_file}: expected a JSON object mapping image name -> relative path")
        for name, relative in paths.items():  # reject "../" escapes before any image is opened
            path_inside(self.image_dir, relative, where=f"{self.split_file}: entry {name!r}")
        self._relative_paths: dict[str, str] = paths
        #: Every image of the split, in the split file's order: the CIRR search space.
        self.gallery: list[str] = list(paths)

    def _find(self, filename: str, folder: str) -> Path:
        candidates = [
            self.root / folder / filename,
            self.root / "cirr" / folder / filename,
            self.root / filename,
        ]
        for path in candidates:
            if path.is_file():
                return path
        tried = ", ".join(str(p.parent) for p in candidates)
        raise MissingFileError(f"CIRR {self.split}: {filename} not found in any of {tried}")

    def _parse(self, records: Any) -> list[CIRRTriplet]:
        triplets = []
        fields = ("pairid", "reference", "caption", "img_set")
        for _, where, record in json_records(
            records, path=self.captions_file, what="triplets", fields=fields
        ):
            img_set = record["img_set"]
            if not isinstance(img_set, dict) or not isinstance(img_set.get("members"), list):
                raise DataError(
                    f"{where} (pairid {record['pairid']}): field 'img_set.members' must be a list"
                )
            target = record.get("target_hard")
            if self.split != "test1" and target is None:
                raise DataError(f"{where} (pairid {record['pairid']}): missing field 'target_hard'")
            soft = record.get("target_soft")
            triplets.append(
                CIRRTriplet(
                    query_id=int(record["pairid"]),
                    reference=str(record["reference"]),
                    caption=str(record["caption"]),
                    target=None if target is None else str(target),
                    members=tuple(str(m) for m in img_set["members"]),
                    set_id=int(img_set.get("id", -1)),
                    target_soft=None if soft is None else {str(k): float(v) for k, v in soft.items()},
                )
            )
        return triplets

    @property
    def triplets(self) -> list[CIRRTriplet]:
        """The queries, by the name the CIRR paper gives them."""
        return self.queries

    def image_path(self, name: str) -> Path:
        """Path of image ``name`` from the split file (``KeyError`` naming the split file if unknown)."""
        try:
            relative = self._relative_paths[name]
        except KeyError:
            raise MissingKeyError(f"CIRR image {name!r} is not listed in {self.split_file}") from None
        return path_inside(self.image_dir, relative, where=f"{self.split_file}: entry {name!r}")
