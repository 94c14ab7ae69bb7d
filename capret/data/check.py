"""Scan a dataset once before a long run: every annotation that does not parse or holds an invalid value (NaN/Inf
boxes, boxes outside their image) and every image that cannot be decoded, in one report.

A training run that meets its first corrupt JPEG after six hours, or an evaluation that silently scores an
``Infinity`` box, costs far more than one pass over the files; ``capret check-data`` runs this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from capret.data.imagefile import decode_image, find_bad_images
from capret.errors import BadImageError, CapretError, ConfigError, MissingFileError

__all__ = ["DataProblem", "DataReport", "check_dataset", "CHECKABLE_DATASETS"]

CHECKABLE_DATASETS = ("deepfashion2", "demo", "fashioniq", "cirr", "circo")
#: Boxes may overhang their image by this many pixels (annotation tools round outward) before they count as
#: outside it.
BOX_TOLERANCE = 1.0


@dataclass(frozen=True)
class DataProblem:
    """One problem: the file, the field (or ``image``) and what is wrong with it."""

    file: str
    field: str
    problem: str


@dataclass
class DataReport:
    dataset: str
    root: str
    split: str
    annotation_files: int = 0
    items: int = 0
    images_checked: int = 0
    problems: list[DataProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["problem_count"] = len(self.problems)
        return out


def check_dataset(
    dataset: str,
    *,
    root: str | Path,
    split: str,
    category: str | None = None,
    images: bool = True,
    progress: bool = False,
) -> DataReport:
    """Check every annotation and (``images=True``) every image of one split; returns the report.

    Raises:
        ValueError: ``dataset`` is not one of :data:`CHECKABLE_DATASETS`.
        FileNotFoundError: the root or the split's annotation folder does not exist (nothing to check).
    """
    root = Path(root)
    if dataset not in CHECKABLE_DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; check-data knows {', '.join(CHECKABLE_DATASETS)}")
    if not root.is_dir():
        raise MissingFileError(f"dataset root {root} does not exist")
    report = DataReport(dataset=dataset, root=str(root), split=split)
    if dataset in ("deepfashion2", "demo"):
        _check_deepfashion2(report, root, split, images=images, progress=progress)
    else:
        _check_cir(report, dataset, root, split, category=category, images=images, progress=progress)
    return report


def _check_deepfashion2(report: DataReport, root: Path, split: str, *, images: bool, progress: bool) -> None:
    from capret.data.deepfashion2 import _annos_dir, _parse_annotation, _scan, image_path

    files, _ = _scan(_annos_dir(root, split))
    report.annotation_files = len(files)
    for image_id, path in _progress(files, progress, "annotations"):
        try:
            items = _parse_annotation(path, image_id, with_geometry=False)
        except (CapretError, ValueError) as exc:
            report.problems.append(DataProblem(str(path), _field_of(str(exc)), str(exc)))
            continue
        report.items += len(items)
        for item in items:
            name = f"item{item.item_index}.bounding_box"
            if not all(math.isfinite(v) for v in item.bbox):
                report.problems.append(DataProblem(str(path), name, f"non-finite box {list(item.bbox)}"))
                items = []
        if not images or not items:
            continue
        picture = image_path(root, split, image_id)
        report.images_checked += 1
        try:
            width, height = decode_image(picture).size
        except BadImageError as exc:
            report.problems.append(DataProblem(str(picture), "image", str(exc)))
            continue
        for item in items:
            x1, y1, x2, y2 = item.bbox
            t = BOX_TOLERANCE
            if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
                report.problems.append(
                    DataProblem(
                        str(path),
                        f"item{item.item_index}.bounding_box",
                        f"box {list(item.bbox)} lies outside the {width}x{height} image {picture.name}",
                    )
                )


def _check_cir(
    report: DataReport,
    dataset: str,
    root: Path,
    split: str,
    *,
    category: str | None,
    images: bool,
    progress: bool,
) -> None:
    paths: list[Path] = []
    try:
        if dataset == "fashioniq":
            from capret.data.fashioniq import CATEGORIES, FashionIQ

            for name in [category] if category else list(CATEGORIES):
                fiq = FashionIQ(root, name, split)
                report.annotation_files += 2
                report.items += len(fiq)
                paths += [fiq.image_path(n) for n in fiq.gallery]
        elif dataset == "cirr":
            from capret.data.cirr import CIRR

            cirr = CIRR(root, split)
            report.annotation_files += 2
            report.items += len(cirr)
            paths += [cirr.image_path(n) for n in cirr.gallery]
        else:
            from capret.data.circo import CIRCO

            circo = CIRCO(root, split)
            report.annotation_files += 1
            report.items += len(circo)
            paths += [circo.image_path(n) for n in circo.gallery]
    except (CapretError, ValueError, KeyError) as exc:
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        report.problems.append(DataProblem(message.split(":", 1)[0], _field_of(message), message))
        return
    if images:
        report.images_checked = len(set(paths))
        for path, reason in find_bad_images(paths, progress=progress):
            report.problems.append(DataProblem(str(path), "image", reason))


def _field_of(message: str) -> str:
    """The field a reader's message names (``field 'item1.style'`` -> ``item1.style``), else ``annotation``."""
    marker = "field '"
    if marker in message:
        return message.split(marker, 1)[1].split("'", 1)[0]
    return "annotation"


def _progress(items: list[Any], enabled: bool, what: str) -> Iterator[Any]:
    from tqdm import tqdm

    yield from tqdm(items, desc=f"check {what}", unit="file", disable=not enabled)
