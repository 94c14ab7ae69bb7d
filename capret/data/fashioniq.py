"""FashionIQ (Wu et al., CVPR 2021) composed-retrieval triplets from the official annotation files.

Layout of ``root`` as the official repository (github.com/XiaoxiaoGuo/fashion-iq) ships it, images beside::

    root/captions/cap.<category>.<split>.json        [{"candidate", "target", "captions": [c1, c2]}, ...]
    root/image_splits/split.<category>.<split>.json  [asin, ...]   (the gallery of that category and split)
    root/images/<asin>.png                           (or .jpg)

A flat folder holding the ``cap.*`` and ``split.*`` files directly is accepted too. The test caption files
carry no ``target``; their triplets get ``target=None``.

Caption pairing follows CLIP4Cir (ANCHORS.md): each triplet has two relative captions, stripped of ``".?, "``
at both ends; evaluation uses ``"C1 and c2"`` (first caption with a capital first letter, second with a small
one); training draws uniformly among ``"C1 and c2"``, ``"C2 and c1"``, ``"C1"``, ``"C2"`` as augmentation.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from capret.data.cir_split import CIRSplit
from capret.data.imagefile import path_inside
from capret.data.transforms import open_image
from capret.errors import ConfigError, DataError, MissingFileError, MissingImageError
from capret.io import read_json

__all__ = [
    "CATEGORIES",
    "PAIRINGS",
    "SPLITS",
    "FashionIQ",
    "FashionIQTriplet",
    "load_json",
    "pair_captions",
]

CATEGORIES: tuple[str, ...] = ("dress", "shirt", "toptee")
SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")

#: The four caption pairings of CLIP4Cir's training augmentation; ``"c1_and_c2"`` is the evaluation one.
Pairing = Literal["c1_and_c2", "c2_and_c1", "c1", "c2"]
PAIRINGS: tuple[str, ...] = ("c1_and_c2", "c2_and_c1", "c1", "c2")


def load_json(path: Path) -> Any:
    """Read a JSON annotation file, naming the file on a missing file or a parse error."""
    return read_json(path, what="annotation file")


def json_records(
    records: Any, *, path: Path, what: str, fields: Sequence[str]
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """``(index, where, record)`` for every entry of an annotation list, after checking that it is a list of
    objects holding ``fields``; an error names the file, the entry and the missing field (``where`` is that
    prefix, for the reader's own checks)."""
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of {what}")
    for index, record in enumerate(records):
        where = f"{path}: entry {index}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object, got {type(record).__name__}")
        for field in fields:
            if field not in record:
                raise DataError(f"{where}: missing field {field!r}")
        yield index, where, record


def _clean(caption: str) -> str:
    return caption.strip(".?, ")


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def pair_captions(captions: Sequence[str], pairing: Pairing = "c1_and_c2") -> str:
    """Join FashionIQ's two relative captions into one modifying text.

    ``"c1_and_c2"`` gives ``"C1 and c2"``: e.g. ``("is red.", "Has long sleeves")`` -> ``"Is red and has long
    sleeves"``. CLIP's tokenizer lower-cases text, so for CLIP models this equals CLIP4Cir's
    ``str.capitalize`` output exactly.
    """
    if len(captions) != 2:
        raise DataError(
            f"FashionIQ triplets have exactly 2 captions, got {len(captions)}: {list(captions)!r}"
        )
    c1, c2 = _clean(captions[0]), _clean(captions[1])
    if pairing == "c1_and_c2":
        return f"{_upper_first(c1)} and {_lower_first(c2)}"
    if pairing == "c2_and_c1":
        return f"{_upper_first(c2)} and {_lower_first(c1)}"
    if pairing == "c1":
        return _upper_first(c1)
    if pairing == "c2":
        return _upper_first(c2)
    raise ConfigError(f"unknown caption pairing {pairing!r}; valid pairings: {', '.join(PAIRINGS)}")


@dataclass(frozen=True)
class FashionIQTriplet:
    """One FashionIQ query: reference (candidate) image, two relative captions, target (``None`` on test).

    ``caption`` is the text the model reads (paired by the dataset's rule); ``query_id`` is the index of the
    triplet in its caption file, the key rankings are given under.
    """

    query_id: int
    category: str
    reference: str
    captions: tuple[str, str]
    caption: str
    target: str | None


class FashionIQ(CIRSplit[FashionIQTriplet]):
    """The triplets of one FashionIQ category and split; ``len()`` is the number of queries.

    Args:
        root: dataset folder (see the module docstring).
        category: ``dress``, ``shirt`` or ``toptee``.
        split: ``train``, ``val`` or ``test``.
        caption_mode: ``"eval"`` always pairs ``"C1 and c2"``; ``"train"`` draws a random pairing per access;
            default ``"train"`` on the train split and ``"eval"`` otherwise.
        seed: seed of a private random generator for the training pairings. ``None`` uses the ``random``
            module, which PyTorch's DataLoader reseeds differently in every worker.
        image_dir: folder of the images (default ``root/images``).
    """

    name = "fashioniq"

    def __init__(
        self,
        root: Path | str,
        category: str,
        split: str,
        *,
        caption_mode: Literal["train", "eval"] | None = None,
        seed: int | None = None,
        image_dir: Path | str | None = None,
    ) -> None:
        if category not in CATEGORIES:
            raise ConfigError(f"unknown FashionIQ category {category!r}; valid: {', '.join(CATEGORIES)}")
        if split not in SPLITS:
            raise ConfigError(f"unknown FashionIQ split {split!r}; valid: {', '.join(SPLITS)}")
        mode = caption_mode or ("train" if split == "train" else "eval")
        if mode not in ("train", "eval"):
            raise ConfigError(f"FashionIQ caption_mode must be 'train' or 'eval', got {caption_mode!r}")
        self.root = Path(root)
        self.category = category
        self.split = split
        self.caption_mode = mode
        self.image_dir = Path(image_dir) if image_dir is not None else self.root / "images"
        self._rng = random.Random(seed) if seed is not None else None
        self.captions_file = self._find(f"cap.{category}.{split}.json", "captions")
        self.split_file = self._find(f"split.{category}.{split}.json", "image_splits")
        self.annotations: list[dict[str, Any]] = load_json(self.captions_file)
        self.queries = self._parse(self.annotations)
        gallery = load_json(self.split_file)
        if not isinstance(gallery, list) or not all(isinstance(n, str) for n in gallery):
            raise DataError(f"{self.split_file}: expected a JSON list of image names (asin strings)")
        names = [
            *gallery,
            *(t.reference for t in self.triplets),
            *(t.target for t in self.triplets if t.target),
        ]
        for name in names:  # image names are file stems: no folders, no "../" escapes
            path_inside(self.image_dir, f"{name}.png", where=f"FashionIQ {category}/{split}: image name")
            if "/" in name or "\\" in name:
                raise DataError(
                    f"FashionIQ {category}/{split}: image name {name!r} must not contain a folder"
                )
        #: Every image of the category and split: the search space of the evaluation (CLIP4Cir protocol).
        self.gallery: list[str] = gallery

    def _find(self, filename: str, folder: str) -> Path:
        official = self.root / folder / filename
        flat = self.root / filename
        if official.is_file():
            return official
        if flat.is_file():
            return flat
        raise MissingFileError(
            f"FashionIQ {self.category}/{self.split}: {filename} not found in {official.parent} or {self.root}"
        )

    def _parse(self, records: Any) -> list[FashionIQTriplet]:
        triplets = []
        fields = ("candidate", "captions")
        for index, where, record in json_records(
            records, path=self.captions_file, what="triplets", fields=fields
        ):
            captions = record["captions"]
            if not isinstance(captions, list) or len(captions) != 2:
                raise DataError(f"{where}: field 'captions' must be a list of 2 strings, got {captions!r}")
            target = record.get("target")
            if self.split != "test" and target is None:
                raise DataError(f"{where}: missing field 'target' (required on split {self.split!r})")
            triplets.append(
                FashionIQTriplet(
                    query_id=index,
                    category=self.category,
                    reference=str(record["candidate"]),
                    captions=(str(captions[0]), str(captions[1])),
                    caption=pair_captions(captions, "c1_and_c2"),
                    target=None if target is None else str(target),
                )
            )
        return triplets

    @property
    def triplets(self) -> list[FashionIQTriplet]:
        """The queries, by the name the FashionIQ paper gives them."""
        return self.queries

    def __getitem__(self, index: int) -> FashionIQTriplet:
        triplet = self.queries[index]
        if self.caption_mode == "eval":
            return triplet
        draw = self._rng.choice(PAIRINGS) if self._rng is not None else random.choice(PAIRINGS)
        return FashionIQTriplet(
            query_id=triplet.query_id,
            category=triplet.category,
            reference=triplet.reference,
            captions=triplet.captions,
            caption=pair_captions(triplet.captions, draw),  # type: ignore[arg-type]
            target=triplet.target,
        )

    def _candidates(self, name: str) -> list[Path]:
        return [self.image_dir / f"{name}{suffix}" for suffix in IMAGE_SUFFIXES]

    def image_path(self, name: str) -> Path:
        """Path of image ``name``: the first existing of ``<asin>.png|.jpg|.jpeg``, else the ``.png`` path."""
        candidates = self._candidates(name)
        for path in candidates:
            if path.is_file():
                return path
        return candidates[0]

    def load_image(self, name: str) -> Image.Image:
        """Open image ``name`` as RGB; a missing image raises ``FileNotFoundError`` naming the files tried."""
        candidates = self._candidates(name)
        for path in candidates:
            if path.is_file():
                return open_image(path)
        tried = ", ".join(str(p) for p in candidates)
        raise MissingImageError(f"FashionIQ image {name!r} not found (tried {tried})", path=candidates[0])

    def _repr_fields(self) -> dict[str, str]:
        return {"category": self.category, "split": self.split}
