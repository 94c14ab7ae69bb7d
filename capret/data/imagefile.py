"""Decoding one image file, with the one error every reader reports.

A dataset lists its items from annotations alone and opens pixels only when a batch needs them, so this is where
a missing or broken image is found; every reader (DeepFashion2, CIR datasets, extraction, captioning) calls
:func:`decode_image` so that the message always names the file, and so that ``on_bad_image: skip`` can
recognise the failure by type (:class:`~capret.errors.BadImageError`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from capret.errors import BadImageError, ConfigError, DataError, MissingImageError

__all__ = [
    "BAD_IMAGE_POLICIES",
    "DECODERS",
    "REDUCE_FACTORS",
    "check_bad_image_policy",
    "decode_image",
    "find_bad_images",
    "path_inside",
]

#: JPEG DCT-domain reduction factors ``decode_image(reduce=...)`` accepts (libjpeg scales 1/1, 1/2, 1/4, 1/8).
REDUCE_FACTORS = (1, 2, 4, 8)

#: ``pil``: PIL decodes every file; ``torchvision``: colour JPEGs go through ``torchvision.io.decode_jpeg`` (the
#: same libjpeg-turbo integer IDCT, bit-identical pixels, about twice as fast as PIL's decoder plus ``convert``),
#: everything else through PIL.
DECODERS = ("pil", "torchvision")

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


def decode_image(
    path: str | Path, *, mode: str = "RGB", reduce: int = 1, decoder: str = "pil"
) -> Image.Image:
    """Open one image fully into memory and convert it to ``mode``.

    Args:
        path: the image file.
        mode: PIL mode of the result.
        reduce: 1, 2, 4 or 8: a JPEG is decoded at ``1/reduce`` of its size in the DCT domain (libjpeg's scaled
            decoding through ``Image.draft``), which skips most of the inverse DCT and colour conversion work
            when the caller downsizes the picture anyway. Other formats ignore it (always full size), so the
            caller reads the scale it got from the result's size.
        decoder: one of :data:`DECODERS`; ``torchvision`` applies to full-size (``reduce=1``) RGB results of
            three-channel JPEGs, the only case where its pixels are known to equal PIL's.

    Raises:
        BadImageError: naming ``path`` when it is empty, truncated, corrupt or not an image; when it is missing,
            the subclass ``MissingImageError`` (also a ``FileNotFoundError``).
    """
    if reduce not in REDUCE_FACTORS:
        raise ConfigError(f"decode_image reduce must be one of {list(REDUCE_FACTORS)}, got {reduce!r}")
    path = Path(path)
    if not path.is_file():
        raise MissingImageError("image not found", path=path)
    if decoder not in DECODERS:
        raise ConfigError(f"decode_image decoder must be one of {list(DECODERS)}, got {decoder!r}")
    try:
        with Image.open(path) as image:
            if decoder == "torchvision" and reduce == 1 and mode == "RGB":
                if image.format == "JPEG" and image.mode == "RGB":  # YCbCr/RGB JPEG; grey, CMYK stay on PIL
                    return _decode_jpeg_torchvision(path)
            if reduce > 1 and image.format == "JPEG":
                width, height = image.size
                # draft picks the DCT scale min(width // w, height // h) (capped at 8) for a requested (w, h)
                image.draft(mode, (max(1, width // reduce), max(1, height // reduce)))
            return image.convert(mode)  # convert() decodes every pixel: truncation shows up here
    except (OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError) as exc:
        # RuntimeError: torchvision's message for a truncated or corrupt JPEG
        raise BadImageError(f"cannot decode image ({type(exc).__name__}: {exc})", path=path) from None


def _decode_jpeg_torchvision(path: Path) -> Image.Image:
    """A colour JPEG decoded by ``torchvision.io.decode_jpeg`` and wrapped as a PIL image (one copy)."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    with warnings.catch_warnings():  # torchvision 0.29 points at torchcodec; the decoder itself is unchanged
        warnings.simplefilter("ignore", DeprecationWarning)
        pixels = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())  # H x W x 3 uint8: RGB


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
