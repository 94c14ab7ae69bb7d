"""Decoding one image file, with the one error every reader reports.

A dataset lists its items from annotations alone and opens pixels only when a batch needs them, so this is where
a missing or broken image is found; every reader (DeepFashion2, CIR datasets, extraction, captioning) calls
:func:`decode_image` so that the message always names the file, and so that ``on_bad_image: skip`` can
recognise the failure by type (:class:`~capret.errors.BadImageError`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from capret.errors import BadImageError, ConfigError, DataError, MissingImageError

__all__ = ["BAD_IMAGE_POLICIES", "check_bad_image_policy", "decode_image", "find_bad_images", "path_inside"]

#: ``error``: the first unreadable image stops the run, naming the file; ``skip``: it is left out and recorded.
BAD_IMAGE_POLICIES = ("error", "skip")


def check_bad_image_policy(policy: str) -> str:
    """``policy`` when it is a valid ``on_bad_image`` value, else a ``ValueError`` listing the valid ones."""
    if policy not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {policy!r}")
    return policy


def path_inside(base: Path, relative: str, *, where: str) -> Path:
    """``base / relative`` when it stays inside ``base`` (lexically: ``..`` and absolute paths are refused,
    symlinked dataset folders still work), else a :class:`~capret.errors.DataError` naming ``where``.

    A split file entry such as ``../../home/user/.ssh/id_rsa`` must never make a reader open a file outside the
    dataset the user pointed ``--root`` at.
    """
    candidate = Path(os.path.normpath(base / relative))
    anchor = Path(os.path.normpath(base))
    if Path(relative).is_absolute() or (candidate != anchor and anchor not in candidate.parents):
        raise DataError(f"{where}: path {relative!r} resolves outside {anchor}; entries must stay inside it")
    return candidate


def decode_image(path: str | Path, *, mode: str = "RGB") -> Image.Image:
    """Open one image fully into memory and convert it to ``mode``.

    Raises:
        BadImageError: naming ``path`` when it is empty, truncated, corrupt or not an image; when it is missing,
            the subclass ``MissingImageError`` (also a ``FileNotFoundError``).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingImageError("image not found", path=path)
    try:
        with Image.open(path) as image:
            return image.convert(mode)  # convert() decodes every pixel: truncation shows up here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"cannot decode image ({type(exc).__name__}: {exc})", path=path) from None


def find_bad_images(
    paths: Sequence[str | Path], *, workers: int | None = None, progress: bool = False
) -> list[tuple[Path, str]]:
    """``(path, reason)`` for every file of ``paths`` that :func:`decode_image` cannot read, in input order.

    Every image is fully decoded (a header check misses truncated JPEGs). Decoding releases the GIL in PIL, so
    a small thread pool scans a split several times faster than a loop.
    """
    from tqdm import tqdm

    def check(path: str | Path) -> str:
        try:
            decode_image(path)
        except BadImageError as exc:
            return str(exc)
        return ""

    unique = list(dict.fromkeys(Path(p) for p in paths))
    count = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=count) as pool:
        reasons = list(
            tqdm(
                pool.map(check, unique),
                total=len(unique),
                desc="check images",
                unit="img",
                disable=not progress,
            )
        )
    return [(path, reason) for path, reason in zip(unique, reasons) if reason]
