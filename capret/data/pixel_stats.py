"""Hand-made colour and texture statistics of an image tile (no weights): the HSV joint histogram of
colour-histogram retrieval (Swain & Ballard, 1991) and the 2 x 2-cell histogram of unsigned gradient orientations
weighted by magnitude (Dalal & Triggs, 2005). Both are L1-normalised; callers square-root them (Hellinger kernel)
or weight them as they need. Used by the quickstart's training-free baseline descriptor and by the ``pixel-mlp``
category classifier's features.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["hsv_histogram", "orientation_histogram"]


def hsv_histogram(tile: Image.Image, bins: tuple[int, int, int]) -> np.ndarray:
    """``[prod(bins)]`` float64 L1-normalised joint histogram of hue, saturation and value."""
    hsv = np.asarray(tile.convert("HSV"), dtype=np.int64)
    edges = np.array(bins)
    idx = (hsv * edges[None, None, :]) // 256
    flat = (idx[..., 0] * edges[1] + idx[..., 1]) * edges[2] + idx[..., 2]
    hist = np.bincount(flat.ravel(), minlength=int(np.prod(edges))).astype(np.float64)
    return hist / max(hist.sum(), 1.0)


def orientation_histogram(tile: Image.Image, bins: int) -> np.ndarray:
    """``[4 * bins]`` float64 L1-normalised gradient-orientation histograms of the tile's 2 x 2 cells (unsigned
    orientation: a stripe and its mirror are the same texture; each pixel votes with its gradient magnitude)."""
    grey = np.asarray(tile.convert("L"), dtype=np.float64) / 255.0
    gy, gx = np.gradient(grey)
    magnitude = np.hypot(gx, gy)
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    bin_index = np.minimum((angle / np.pi * bins).astype(np.int64), bins - 1)
    half_h, half_w = grey.shape[0] // 2, grey.shape[1] // 2
    cells = []
    for cy in (0, half_h):
        for cx in (0, half_w):
            b = bin_index[cy : cy + half_h, cx : cx + half_w].ravel()
            m = magnitude[cy : cy + half_h, cx : cx + half_w].ravel()
            cells.append(np.bincount(b, weights=m, minlength=bins))
    hist = np.concatenate(cells)
    return hist / max(hist.sum(), 1e-12)
