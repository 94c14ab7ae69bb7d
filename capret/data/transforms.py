"""Image preprocessing for CLIP-style encoders, including the padding of CLIP4Cir.

CLIP's own preprocessing resizes the short side and centre-crops, which cuts away the ends of elongated
images (a full-length dress photographed on a tall canvas loses its hem). Baldrati et al. (CLIP4Cir, "Effective
conditioned and composed image retrieval combining CLIP-based features", CVPR-W 2022, section 4) pad such
images first: ``TargetPad`` pads only images whose aspect ratio exceeds a target ratio (1.25), and only up to
that ratio, so the crop keeps most of the garment while barely shrinking it; ``SquarePad`` pads every image to
a square. See ``ANCHORS.md`` for the exact rule.

The module also holds ``open_image``: every dataset opens its images lazily through it, so a missing image
always fails the same way, naming the file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from capret.data.imagefile import decode_image
from capret.errors import ConfigError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "PAD_CHOICES",
    "SquarePad",
    "TargetPad",
    "clip_transform",
    "open_image",
]

#: Normalisation statistics of OpenAI CLIP (the pixel mean/std of its training set).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

PadName = Literal["targetpad", "squarepad"]
PAD_CHOICES: tuple[str, ...] = ("targetpad", "squarepad")


def open_image(path: Path | str, *, mode: str = "RGB") -> Image.Image:
    """Open one image fully into memory and convert it to ``mode``.

    Datasets build from annotation files alone and open pixels only here, at the last moment, so a dataset
    whose images were never downloaded still lists its queries; this is where a missing image is reported.

    Raises:
        BadImageError: naming a file that is missing or cannot be decoded (empty, truncated, corrupt, not an
            image).
    """
    return decode_image(path, mode=mode)


class SquarePad:
    """Pad an image symmetrically with black to a square of side ``max(w, h)``.

    Left/right get ``int((max - w) / 2)`` pixels each (top/bottom likewise), as in CLIP4Cir, so an odd
    difference leaves the result one pixel short of square; the following centre crop removes that pixel.
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        side = max(w, h)
        hp = int((side - w) / 2)
        vp = int((side - h) / 2)
        if hp == 0 and vp == 0:
            return image
        return F.pad(image, [hp, vp, hp, vp], fill=0, padding_mode="constant")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TargetPad:
    """Pad elongated images up to a target aspect ratio (CLIP4Cir's ``TargetPad``).

    With ``r = max(w, h) / min(w, h)``: if ``r < target_ratio`` the image is returned unchanged; otherwise
    with ``s = max(w, h) / target_ratio`` the sides get ``int((s - w) / 2)`` and ``int((s - h) / 2)`` black
    pixels (clamped at 0), which brings the ratio down to ``target_ratio``. Only the short side grows because
    ``s >= min(w, h)`` exactly when ``r >= target_ratio``.
    """

    def __init__(self, target_ratio: float = 1.25) -> None:
        if not target_ratio >= 1.0:
            raise ConfigError(f"TargetPad target_ratio must be >= 1.0, got {target_ratio!r}")
        self.target_ratio = float(target_ratio)

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        long_side, short_side = max(w, h), min(w, h)
        if short_side == 0 or long_side / short_side < self.target_ratio:
            return image
        scaled = long_side / self.target_ratio
        hp = max(int((scaled - w) / 2), 0)
        vp = max(int((scaled - h) / 2), 0)
        if hp == 0 and vp == 0:
            return image
        return F.pad(image, [hp, vp, hp, vp], fill=0, padding_mode="constant")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_ratio={self.target_ratio})"


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def clip_transform(
    size: int,
    *,
    pad: PadName | None = "targetpad",
    target_ratio: float = 1.25,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """Build CLIP preprocessing with optional CLIP4Cir padding.

    Pipeline: RGB -> pad (``"targetpad"``, ``"squarepad"`` or none) -> Resize(short side = ``size``, bicubic)
    -> CenterCrop(``size``) -> ToTensor -> Normalize(``mean``, ``std``). ``pad=None`` reproduces CLIP's own
    preprocessing. The result maps a PIL image to a float tensor ``[3, size, size]``.
    """
    if size <= 0:
        raise ConfigError(f"clip_transform size must be a positive integer, got {size!r}")
    steps: list[Callable[..., object]] = [_to_rgb]
    if pad == "targetpad":
        steps.append(TargetPad(target_ratio))
    elif pad == "squarepad":
        steps.append(SquarePad())
    elif pad is not None:
        raise ConfigError(f"clip_transform pad={pad!r} is not valid; choose one of {PAD_CHOICES} or None")
    steps += [
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean=list(mean), std=list(std)),
    ]
    return T.Compose(steps)
