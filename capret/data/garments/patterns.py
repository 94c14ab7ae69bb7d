"""Fabric: the pattern a garment is printed with and the material cue on its surface, as pixel arrays.

Textures are computed in body-frame units (see :mod:`.shapes`), not in pixels, so a stripe keeps its width
relative to the garment at every scale and bends with it under the consumer photos' perspective warps. The
"print" pattern is a duotone of a textured patch of a scikit-image photograph (the photographs ship with the
library, no download), so printed garments carry real, irregular texture that SIFT can match.

Material cues are multiplicative shading maps that a person would read at a glance: a diagonal twill for denim,
vertical ribs for knit, a broad soft sheen for satin, specular highlights and darker edges for leather, an almost
flat surface for cotton.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from capret.data.garments.vocab import COLOURS
from capret.errors import DataError

__all__ = ["PRINT_PHOTOS", "Look", "fabric", "load_photo", "sample_look"]

#: scikit-image photographs whose textured patches become prints (grey ones work as well: prints are duotones).
PRINT_PHOTOS: tuple[str, ...] = (
    "coffee",
    "grass",
    "gravel",
    "astronaut",
    "chelsea",
    "coins",
    "text",
    "rocket",
)
_PRINT_TILE = 64  # side of a print tile in pixels; it repeats every _PRINT_UNITS frame units
_PRINT_UNITS = 70.0


@dataclass(frozen=True)
class Look:
    """Shape and texture parameters of one identity that are not attributes (shared by a family's members).

    ``flare`` widens skirts, trouser legs and hems; ``period`` is the stripe/check/dot repeat in frame units;
    ``phase`` shifts patterns and sheens; ``print_photo`` and ``print_box`` name the photograph patch of a print.
    """

    flare: float
    period: float
    phase: float
    print_photo: str
    print_box: tuple[int, int, int, int]


@functools.lru_cache(maxsize=32)
def load_photo(name: str) -> np.ndarray:
    """A ``skimage.data`` image as uint8 RGB (grey ones repeated over 3 channels); read once per process."""
    import skimage.data

    loader = getattr(skimage.data, name, None)
    if loader is None:
        raise DataError(f"scikit-image has no photograph {name!r} (skimage.data.{name})")
    image = np.asarray(loader())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        image = (np.clip(image.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = np.ascontiguousarray(image[..., :3])
    image.setflags(write=False)
    return image


def sample_look(rng: np.random.Generator) -> Look:
    """Draw the non-attribute parameters of a family of identities."""
    photo = PRINT_PHOTOS[int(rng.integers(len(PRINT_PHOTOS)))]
    height, width = load_photo(photo).shape[:2]
    side = int(rng.integers(48, 97))
    x1, y1 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    return Look(
        flare=float(rng.uniform(0.0, 1.0)),
        period=float(rng.uniform(11.0, 18.0)),
        phase=float(rng.uniform(0.0, 1.0)),
        print_photo=photo,
        print_box=(x1, y1, x1 + side, y1 + side),
    )


@functools.lru_cache(maxsize=512)
def _print_tile(photo: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """``[64, 64]`` float grey tile in [0, 1], contrast-stretched so faint textures still show."""
    x1, y1, x2, y2 = box
    crop = Image.fromarray(load_photo(photo)[y1:y2, x1:x2]).convert("L")
    grey = np.asarray(crop.resize((_PRINT_TILE, _PRINT_TILE), Image.Resampling.BILINEAR), dtype=np.float64)
    lo, hi = np.percentile(grey, [5, 95])
    tile = np.clip((grey - lo) / max(hi - lo, 1.0), 0.0, 1.0)
    tile.setflags(write=False)
    return tile


def _mix(a: np.ndarray, b: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return a * (1.0 - weight[..., None]) + b * weight[..., None]


def _material_map(material: str, u: np.ndarray, v: np.ndarray, look: Look) -> tuple[np.ndarray, np.ndarray]:
    """Multiplicative shading and an additive gloss (both ``[H, W]``) for a material cue."""
    flat = np.ones_like(u)
    gloss = np.zeros_like(u)
    two_pi = 2.0 * np.pi
    if material == "cotton":
        flat = 1.0 + 0.03 * np.sin(two_pi * (v / 41.0 + look.phase)) * np.sin(two_pi * u / 57.0)
    elif material == "denim":
        twill = np.sin(two_pi * (u + v) / 5.0)
        fade = 0.05 * np.sin(two_pi * (v / 90.0 + look.phase))
        flat = 1.0 + 0.11 * twill + fade
    elif material == "knit":
        rib = np.abs(np.sin(np.pi * u / 4.5))
        flat = 0.86 + 0.2 * rib + 0.03 * np.sin(two_pi * v / 6.0)
    elif material == "leather":
        centre_u, centre_v = 85.0 + 30.0 * look.phase, 110.0 + 60.0 * look.phase
        highlight = np.exp(-(((u - centre_u) / 18.0) ** 2 + ((v - centre_v) / 40.0) ** 2))
        flat = 0.82 + 0.06 * np.sin(two_pi * v / 70.0)
        gloss = 110.0 * highlight
    elif material == "satin":
        wave = np.sin(two_pi * ((0.75 * u + 0.35 * v) / 55.0 + look.phase))
        flat = 1.0 + 0.18 * wave
        gloss = 55.0 * np.clip(wave, 0.0, 1.0) ** 3
    else:
        raise DataError(f"unknown material {material!r}")
    return flat, gloss


def fabric(
    attributes: Mapping[str, Any],
    look: Look,
    *,
    size: tuple[int, int],
    scale: float,
    offset: tuple[float, float],
) -> np.ndarray:
    """``[H, W, 3]`` float RGB in [0, 255]: the garment's pattern and material over a whole canvas.

    Pixel ``(x, y)`` of the canvas lies at frame point ``((x - offset_x) / scale, (y - offset_y) / scale)``;
    the caller keeps only the pixels inside the garment's silhouette.
    """
    width, height = size
    xs = (np.arange(width, dtype=np.float32) + np.float32(0.5 - offset[0])) / np.float32(scale)
    ys = (np.arange(height, dtype=np.float32) + np.float32(0.5 - offset[1])) / np.float32(scale)
    u, v = np.meshgrid(xs, ys)
    main = np.asarray(COLOURS[str(attributes["colour"])], dtype=np.float32)
    second_name = attributes.get("secondary_colour") or attributes["colour"]
    second = np.asarray(COLOURS[str(second_name)], dtype=np.float32)
    pattern = str(attributes.get("pattern") or "solid")
    period = look.period
    shift = look.phase * period
    if pattern == "solid":
        rgb = np.broadcast_to(main, (height, width, 3)).astype(np.float32)
    elif pattern == "horizontal stripes":
        band = (np.floor((v + shift) / (period / 2.0)) % 2).astype(np.float32)
        rgb = _mix(main, second, band)
    elif pattern == "vertical stripes":
        band = (((u - 100.0 + shift) % period) < period * 0.3).astype(np.float32)
        rgb = _mix(main, second, band)
    elif pattern == "checks":
        a = np.floor((u + shift) / period) % 2
        b = np.floor((v + shift) / period) % 2
        rgb = _mix(main, second, 0.5 * a + 0.5 * b)
    elif pattern == "dots":
        pitch = period * 1.1
        row = np.floor(v / pitch)
        du = (u + 0.5 * pitch * (row % 2)) % pitch - pitch / 2
        dv = v % pitch - pitch / 2
        dot = ((du**2 + dv**2) < (0.24 * pitch) ** 2).astype(np.float32)
        rgb = _mix(main, second, dot)
    elif pattern == "print":
        tile = _print_tile(look.print_photo, look.print_box)
        iu = ((u / _PRINT_UNITS) % 1.0 * _PRINT_TILE).astype(np.int64) % _PRINT_TILE
        iv = ((v / _PRINT_UNITS) % 1.0 * _PRINT_TILE).astype(np.int64) % _PRINT_TILE
        rgb = _mix(main, second, tile[iv, iu].astype(np.float32))
    else:
        raise DataError(f"unknown pattern {pattern!r}")
    flat, gloss = _material_map(str(attributes.get("material") or "cotton"), u, v, look)
    out = rgb * flat[..., None]
    out += gloss[..., None]
    return np.clip(out, 0.0, 255.0, out=out)
