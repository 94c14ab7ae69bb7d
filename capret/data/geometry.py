"""Plane geometry shared by the synthetic photo generators (the demo world and the garment world).

Both render a flat texture through a projective map onto a canvas and then annotate what landed in the frame, so
they need the same four pieces: the map from four point pairs, applying it to points, warping an image through
it, and clipping / measuring the projected outline. One implementation keeps the two worlds' annotations
consistent with each other. It also names the pixel box type (:data:`Box`) that detectors, galleries and
captioners pass around, so each of them need not spell it again.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["Box", "apply_homography", "clip_polygon", "homography", "polygon_area", "warp"]

#: An axis-aligned box ``(x1, y1, x2, y2)`` in pixels: what detectors return and galleries store for an item.
Box = tuple[float, float, float, float]


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 projective map taking 4 source points onto 4 destination points (direct linear transform)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y])
        rows.append([0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y])
        rhs += [u, v]
    h = np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64))
    return np.append(h, 1.0).reshape(3, 3)


def apply_homography(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``[N, 2]`` points mapped through ``h`` (homogeneous coordinates, divided back)."""
    pts = np.c_[points, np.ones(len(points))] @ h.T
    return pts[:, :2] / pts[:, 2:3]


def warp(
    image: Image.Image,
    h: np.ndarray,
    size: tuple[int, int],
    *,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> Image.Image:
    """Render ``image`` through ``h`` (image -> canvas) onto a canvas of ``size``; PIL wants canvas -> image."""
    inv = np.linalg.inv(h)
    inv = inv / inv[2, 2]
    return image.transform(size, Image.Transform.PERSPECTIVE, tuple(inv.ravel()[:8]), resample)


def clip_polygon(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Sutherland-Hodgman clipping of a polygon to the image rectangle ``[0, width] x [0, height]``."""
    poly = [tuple(p) for p in points]
    for axis, bound, sign in ((0, 0.0, 1), (0, float(width), -1), (1, 0.0, 1), (1, float(height), -1)):
        if not poly:
            break
        out = []
        for i, cur in enumerate(poly):
            prev = poly[i - 1]
            cur_in = sign * (cur[axis] - bound) >= 0
            prev_in = sign * (prev[axis] - bound) >= 0
            if cur_in != prev_in:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append(tuple(p + t * (c - p) for p, c in zip(prev, cur)))
            if cur_in:
                out.append(cur)
        poly = out
    return np.asarray(poly, dtype=np.float64).reshape(-1, 2)


def polygon_area(points: np.ndarray) -> float:
    """Area of a simple polygon (shoelace formula)."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
