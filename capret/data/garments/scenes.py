"""Shop and consumer photographs of painted garments, each with DeepFashion2 item annotations.

A *shop* photo is the garment alone, frontal, centred on a plain light background (DeepFashion2's commercial
images). A *consumer* photo models what makes street photos hard (Ge et al., CVPR 2019, Sec. 3): the garment is
worn in an outfit on a figure (or lies alone on a surface), seen through a perspective warp with rotation and
scale (sometimes so close that it runs off the frame), partly hidden by an arm, a bag or another garment, in
front of clutter cut from scikit-image photographs, under a white-balance and lighting shift, with blur, sensor
noise and a JPEG quality drawn per photo. The annotation fields say how each view was rendered: ``occlusion``
from the share of the garment hidden, ``zoom_in`` from the share left outside the frame, ``scale`` from its
share of the photo, ``viewpoint`` 1 when no one wears it, 2 frontal, 3 strongly turned.

Boxes, polygons and landmark visibility are measured on the label map painted with the colour image, so they
are exactly what the pixels show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from capret.data.deepfashion2 import CATEGORIES as DF2_CATEGORIES
from capret.data.deepfashion2 import KEYPOINT_COUNTS
from capret.data.garments.paint import Dressed, Garment, paint_figure
from capret.data.garments.patterns import load_photo
from capret.data.garments.shapes import Body
from capret.data.garments.vocab import category_id
from capret.data.geometry import apply_homography, clip_polygon, homography, polygon_area, warp

__all__ = ["BACKGROUND_PHOTOS", "ItemView", "Photo", "consumer_photo", "shop_photo"]

#: scikit-image photographs cut into the clutter behind consumer photos.
BACKGROUND_PHOTOS: tuple[str, ...] = (
    "astronaut", "coffee", "rocket", "chelsea", "brick", "grass", "gravel", "immunohistochemistry",
    "hubble_deep_field", "camera", "coins", "moon", "retina", "cell", "clock",
)  # fmt: skip
_SKIN = ((241, 206, 180), (224, 180, 150), (198, 144, 108), (160, 110, 80), (110, 74, 52), (80, 54, 40))
_HAIR = ((30, 24, 20), (70, 45, 30), (140, 95, 50), (200, 170, 110), (120, 120, 120))
_SHOES = ((30, 30, 32), (240, 240, 240), (120, 70, 40), (60, 60, 90))
_MIN_VISIBLE_PX = 80  # an item showing fewer pixels is not annotated (a detector could not find it either)
_MAX_RENDER_SCALE = 1.6  # figures are painted at most this many px per frame unit, then warped up


@dataclass
class ItemView:
    """One annotated garment in one photo: ``garment`` indexes the photo's garment list."""

    garment: int
    category_id: int
    bbox: list[int]
    segmentation: list[list[float]]
    landmarks: list[int]
    scale: int
    occlusion: int
    zoom_in: int
    viewpoint: int

    def to_item(self, *, style: int) -> dict[str, Any]:
        """The official ``itemN`` object (field order as in DeepFashion2's files)."""
        return {
            "segmentation": self.segmentation,
            "scale": self.scale,
            "viewpoint": self.viewpoint,
            "zoom_in": self.zoom_in,
            "landmarks": self.landmarks,
            "style": style,
            "bounding_box": self.bbox,
            "category_id": self.category_id,
            "occlusion": self.occlusion,
            "category_name": DF2_CATEGORIES[self.category_id],
        }


@dataclass
class Photo:
    """A rendered photo: the RGB image, the JPEG quality to save it with, its annotated items."""

    image: Image.Image
    quality: int
    items: list[ItemView] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ geometry


def _along(outline: np.ndarray, count: int) -> np.ndarray:
    """``count`` points evenly spaced along a closed outline (stand-ins for the category's landmarks)."""
    closed = np.vstack([outline, outline[:1]])
    lengths = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    cum = np.r_[0.0, np.cumsum(lengths)]
    targets = np.arange(count) * cum[-1] / count
    seg = np.clip(np.searchsorted(cum, targets, side="right") - 1, 0, len(lengths) - 1)
    t = (targets - cum[seg]) / np.maximum(lengths[seg], 1e-9)
    return closed[seg] + t[:, None] * (closed[seg + 1] - closed[seg])


def _level(value: float, cuts: tuple[float, float]) -> int:
    return 1 if value < cuts[0] else 2 if value < cuts[1] else 3


# ------------------------------------------------------------------------------------------------ compose


def _annotate(
    dressed: Dressed,
    garments: Sequence[Garment],
    *,
    h: np.ndarray,
    render_scale: float,
    size: tuple[int, int],
    viewpoint: int,
) -> list[ItemView]:
    """Item annotations of a painted figure warped by ``h`` (figure pixels -> photo) onto a ``size`` photo."""
    width, height = size
    labels = np.asarray(warp(Image.fromarray(dressed.labels), h, size, resample=Image.Resampling.NEAREST))
    items: list[ItemView] = []
    for index, garment in enumerate(garments):
        visible = labels == index + 1
        count = int(visible.sum())
        if count < _MIN_VISIBLE_PX:
            continue
        full_mask = Image.fromarray((dressed.full[index] * 255).astype(np.uint8))
        full_in = int((np.asarray(warp(full_mask, h, size, resample=Image.Resampling.NEAREST)) > 127).sum())
        shape = dressed.layers[index].shape
        outline_px = shape.outline() * render_scale
        ratio = polygon_area(apply_homography(h, outline_px)) / max(polygon_area(outline_px), 1e-9)
        full_total = max(float(dressed.full[index].sum()) * ratio, 1.0)
        polygons = []
        for part in shape.parts:
            clipped = clip_polygon(apply_homography(h, part * render_scale), width, height)
            if len(clipped) >= 3 and polygon_area(clipped) >= 1.0:
                polygons.append([round(float(v), 2) for v in clipped.ravel()])
        cid = category_id(str(garment.attributes["category"]))
        landmarks: list[int] = []
        for x, y in apply_homography(h, _along(outline_px, KEYPOINT_COUNTS[cid])):
            if 0 <= x < width and 0 <= y < height:
                xi, yi = int(x), int(y)
                near = visible[max(0, yi - 2) : yi + 3, max(0, xi - 2) : xi + 3]
                landmarks += [round(float(x)), round(float(y)), 2 if near.any() else 1]
            else:
                landmarks += [0, 0, 0]
        ys, xs = np.nonzero(visible)
        items.append(
            ItemView(
                garment=index,
                category_id=cid,
                bbox=[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                segmentation=polygons,
                landmarks=landmarks,
                scale=_level(count / (width * height), (0.1, 0.35)),
                occlusion=_level(1.0 - count / max(full_in, 1), (0.1, 0.3)),
                zoom_in=_level(1.0 - full_in / full_total, (0.03, 0.3)),
                viewpoint=viewpoint,
            )
        )
    return items


def shop_photo(garment: Garment, *, size: int, rng: np.random.Generator) -> Photo:
    """The garment alone, frontal, centred on a plain light background (a product photo)."""
    scale = min(_MAX_RENDER_SCALE * 1.5, size * float(rng.uniform(0.72, 0.84)) / _extent(garment))
    dressed = paint_figure([garment], body=None, scale=scale, bag=None)
    x1, y1, x2, y2 = garment.silhouette().bounds()
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2]) * scale
    shift = np.array([size / 2, size / 2]) - centre + rng.uniform(-0.02, 0.02, size=2) * size
    h = np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]], [0.0, 0.0, 1.0]])
    tone = rng.uniform(228, 250) + rng.uniform(-4, 4, size=3)
    canvas = Image.new("RGBA", (size, size), tuple(int(v) for v in tone.clip(0, 255)) + (255,))
    canvas.alpha_composite(warp(dressed.image, h, (size, size), resample=Image.Resampling.BILINEAR))
    items = _annotate(dressed, [garment], h=h, render_scale=scale, size=(size, size), viewpoint=1)
    return Photo(image=canvas.convert("RGB"), quality=92, items=items)


def _extent(garment: Garment) -> float:
    x1, y1, x2, y2 = garment.silhouette().bounds()
    return max(x2 - x1, y2 - y1)


def _background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    photo = load_photo(BACKGROUND_PHOTOS[int(rng.integers(len(BACKGROUND_PHOTOS)))])
    height, width = photo.shape[:2]
    frac = rng.uniform(0.35, 0.9)
    cw, ch = max(16, int(width * frac)), max(16, int(height * frac))
    x, y = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
    crop = Image.fromarray(photo[y : y + ch, x : x + cw]).resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:  # depth of field: the clutter behind a person is often out of focus
        crop = crop.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.8, 2.5))))
    return crop


def _photometric(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """White balance, exposure (gamma), a lighting ramp, blur and sensor noise."""
    width, height = image.size
    gain = rng.uniform(0.8, 1.2, size=3)
    gain /= gain.mean() / rng.uniform(0.85, 1.15)
    gamma = rng.uniform(0.8, 1.25)
    levels = (np.arange(256) / 255.0) ** gamma
    lut = np.concatenate([np.clip(levels * g * 255.0 + 0.5, 0, 255) for g in gain]).astype(np.uint8)
    image = image.point(lut.tolist())  # white balance and exposure as one per-channel look-up table
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-12
    strength = rng.uniform(0.05, 0.3)
    xs = (np.arange(width, dtype=np.float32) / width - 0.5) * np.float32(strength * direction[0])
    ys = (np.arange(height, dtype=np.float32) / height - 0.5) * np.float32(strength * direction[1])
    ramp = (1.0 + ys[:, None] + xs[None, :]) / np.float32(255.0)
    pixels = np.asarray(image, dtype=np.float32) * ramp[..., None]
    noise = rng.uniform(0.0, 0.03)
    if noise > 0.005:
        pixels += rng.standard_normal(size=pixels.shape, dtype=np.float32) * np.float32(noise)
    out = Image.fromarray((pixels.clip(0, 1) * 255).round().astype(np.uint8))
    blur = rng.uniform(0.0, 1.2)
    if blur > 0.35:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(blur)))
    return out


def random_body(rng: np.random.Generator) -> Body:
    """A figure with drawn skin, hair and shoe colours and arm pose."""
    return Body(
        skin=_SKIN[int(rng.integers(len(_SKIN)))],
        hair=_HAIR[int(rng.integers(len(_HAIR)))],
        shoes=_SHOES[int(rng.integers(len(_SHOES)))],
        arm_across=bool(rng.random() < 0.3),
    )


def consumer_photo(
    garments: Sequence[Garment], *, size: int, worn: bool, rng: np.random.Generator, attempts: int = 6
) -> Photo:
    """A street photo centred on ``garments[0]``; redrawn (up to ``attempts`` times, from the same generator)
    while that garment shows fewer than the pixels an annotation needs, so every photo shows its subject."""
    photo = _consumer_once(garments, size=size, worn=worn, rng=rng)
    for _ in range(attempts - 1):
        if any(item.garment == 0 for item in photo.items):
            break
        photo = _consumer_once(garments, size=size, worn=worn, rng=rng)
    return photo


def _consumer_once(garments: Sequence[Garment], *, size: int, worn: bool, rng: np.random.Generator) -> Photo:
    """A street photo centred on ``garments[0]`` (worn with the others on a figure, or lying alone).

    Framing is drawn per photo: the whole figure (30 %), the garment filling half the frame or more (55 %), or
    a close-up where the garment runs off the frame (15 %); then a rotation of up to 18 degrees and perspective
    jitter of the corners, clutter, occluders and the photometric shifts of :func:`_photometric`.
    """
    shapes = [(size, size), (size, size * 3 // 4), (size * 3 // 4, size)]
    width, height = shapes[int(rng.integers(len(shapes)))]
    body = random_body(rng) if worn else None
    bag = None
    if worn and rng.random() < 0.25:
        bag = (tuple(int(c) for c in rng.integers(20, 200, size=3)), bool(rng.random() < 0.5))
    x1, y1, x2, y2 = garments[0].silhouette().bounds()
    mode = rng.random()
    if worn and mode < 0.3:
        x1, y1, x2, y2, fill = 30.0, 8.0, 170.0, 388.0, rng.uniform(0.85, 0.98)
    elif mode < 0.85:
        fill = rng.uniform(0.5, 0.85)
    else:
        fill = rng.uniform(1.0, 1.35)
    k = fill * min(width / (x2 - x1), height / (y2 - y1))
    render_scale = min(k, _MAX_RENDER_SCALE)
    dressed = paint_figure(garments, body=body, scale=render_scale, bag=bag)  # type: ignore[arg-type]
    src = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]]) * render_scale
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    target = (src / render_scale - centre) * k
    angle = np.deg2rad(rng.uniform(-18, 18))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    jitter = rng.uniform(-0.08, 0.08, size=(4, 2)) * np.array([width, height])
    where = np.array([width, height]) / 2 + rng.uniform(-0.1, 0.1, size=2) * np.array([width, height])
    h = homography(src, target @ rot.T + where + jitter)
    canvas = _background((width, height), rng).convert("RGBA")
    canvas.alpha_composite(warp(dressed.image, h, (width, height), resample=Image.Resampling.BILINEAR))
    turned = abs(np.rad2deg(angle)) > 12 or float(np.abs(jitter).mean()) > 0.05 * min(width, height)
    viewpoint = 1 if not worn else 3 if turned else 2
    items = _annotate(dressed, garments, h=h, render_scale=render_scale, size=(width, height),
                      viewpoint=viewpoint)  # fmt: skip
    image = _photometric(canvas.convert("RGB"), rng)
    return Photo(image=image, quality=int(rng.integers(40, 91)), items=items)
