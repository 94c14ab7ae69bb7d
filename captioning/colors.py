"""Colour names measured from pixels, for the model-free ``template`` backend.

Pixels are mapped to the nearest colour of a small named palette in CIELAB (Euclidean distance there is the
CIE76 colour difference, which tracks perceived difference far better than RGB distance), and the palette
histogram over the item's region gives its dominant colour names with their pixel shares.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

__all__ = ["PALETTE", "PALETTE_VERSION", "colour_shares", "dominant_colours"]

PALETTE_VERSION = "capret-palette-v1"

#: Named colours (sRGB) chosen to cover garment colours with names people search for.
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "dark grey": (70, 70, 70),
    "grey": (128, 128, 128),
    "light grey": (190, 190, 190),
    "white": (245, 245, 245),
    "red": (200, 30, 35),
    "dark red": (120, 20, 30),
    "orange": (240, 130, 30),
    "yellow": (240, 215, 50),
    "beige": (220, 195, 150),
    "brown": (120, 75, 40),
    "olive": (120, 120, 40),
    "green": (50, 150, 60),
    "dark green": (20, 80, 40),
    "teal": (20, 130, 130),
    "light blue": (150, 190, 230),
    "blue": (40, 80, 200),
    "navy": (25, 35, 85),
    "purple": (110, 50, 140),
    "pink": (240, 150, 180),
}


@lru_cache(maxsize=1)
def _palette_lab() -> tuple[list[str], np.ndarray]:
    from skimage.color import rgb2lab

    names = list(PALETTE)
    rgb = np.array([PALETTE[n] for n in names], dtype=np.float64)[None] / 255.0
    return names, rgb2lab(rgb)[0]


def colour_shares(image: Image.Image, *, max_side: int = 48) -> dict[str, float]:
    """Share of pixels (0..1) nearest to each palette colour, largest first; empty image -> empty dict."""
    from skimage.color import rgb2lab

    if image.width == 0 or image.height == 0:
        return {}
    small = image.convert("RGB")
    if max(small.size) > max_side:
        scale = max_side / max(small.size)
        small = small.resize((max(1, round(small.width * scale)), max(1, round(small.height * scale))))
    pixels = np.asarray(small, dtype=np.float64).reshape(1, -1, 3) / 255.0
    lab = rgb2lab(pixels)[0]
    names, palette = _palette_lab()
    # squared distances |x|^2 - 2 x.p + |p|^2 as one matrix product (the |x|^2 term does not change the argmin)
    nearest = np.argmin((palette**2).sum(1)[None, :] - 2.0 * lab @ palette.T, axis=1)
    counts = np.bincount(nearest, minlength=len(names)) / len(nearest)
    order = np.argsort(-counts, kind="stable")
    return {names[i]: float(counts[i]) for i in order if counts[i] > 0}


def dominant_colours(image: Image.Image, *, min_share: float = 0.15, top: int = 2) -> list[str]:
    """Names of up to ``top`` colours covering at least ``min_share`` of the pixels (at least one name)."""
    shares = colour_shares(image)
    if not shares:
        return []
    names = [n for n, s in shares.items() if s >= min_share][:top]
    return names or [next(iter(shares))]
