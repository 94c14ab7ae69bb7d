"""Paint silhouettes into pixels: one garment as an RGBA layer, and a dressed figure with a label map.

The label map of a figure gives, per pixel, which garment (1-based, in the order given) is visible there, or 0
(background, skin, hair, bags, arms in front). It is painted with exactly the polygons and z-order of the colour
image, so visible masks, boxes, occlusion levels and landmark visibility are measured from what was drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from capret.data.garments.patterns import Look, fabric
from capret.data.garments.shapes import FRAME, Body, Silhouette, body_parts, forearm_across, silhouette
from capret.data.garments.vocab import BOTTOMS, COLOURS, OUTWEAR, luminance

__all__ = ["Dressed", "Garment", "Layer", "paint_figure", "paint_garment", "z_order"]

_OUTLINE_DARK = 0.55  # outline colour = fabric main colour times this
_STITCH = (214, 160, 60)  # denim's contrast stitching


@dataclass(frozen=True)
class Garment:
    """One garment to paint: its attributes (vocabulary of :mod:`.vocab`) and its family's :class:`Look`."""

    attributes: Mapping[str, Any]
    look: Look

    def silhouette(self) -> Silhouette:
        return silhouette(self.attributes, flare=self.look.flare)


@dataclass
class Layer:
    """A painted garment: ``rgba`` (canvas size), and the silhouette it was painted from."""

    rgba: Image.Image
    shape: Silhouette


def _to_px(points: np.ndarray, scale: float, offset: tuple[float, float]) -> list[tuple[float, float]]:
    return [(float(x * scale + offset[0]), float(y * scale + offset[1])) for x, y in points]


def _shade(colour: Sequence[float], factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(round(c * factor), 0, 255)) for c in colour)  # type: ignore[return-value]


def _contrast(colour_name: str) -> tuple[int, int, int]:
    return (250, 248, 240) if luminance(colour_name) < 0.5 else (30, 30, 34)


def paint_garment(
    garment: Garment,
    *,
    size: tuple[int, int],
    scale: float,
    offset: tuple[float, float],
    inner: tuple[int, int, int] | None,
) -> Layer:
    """Paint ``garment`` onto a transparent canvas of ``size``, frame point ``p`` at ``p * scale + offset``.

    ``inner`` fills the neckline cut and an open front (the inside of the garment, as in a product photo);
    ``None`` leaves them transparent so what is worn beneath shows through.
    """
    attributes = garment.attributes
    shape = garment.silhouette()
    mask = Image.new("L", size, 0)
    draw_mask = ImageDraw.Draw(mask)
    for part in shape.parts:
        draw_mask.polygon(_to_px(part, scale, offset), fill=255)
    # the fabric is computed inside the garment's box only (the costliest step of rendering)
    x1, y1, x2, y2 = shape.bounds()
    left, top = max(0, int(x1 * scale + offset[0]) - 2), max(0, int(y1 * scale + offset[1]) - 2)
    right = min(size[0], int(np.ceil(x2 * scale + offset[0])) + 2)
    bottom = min(size[1], int(np.ceil(y2 * scale + offset[1])) + 2)
    image = Image.new("RGB", size, (0, 0, 0))
    if right > left and bottom > top:
        pixels = fabric(attributes, garment.look, size=(right - left, bottom - top), scale=scale,
                        offset=(offset[0] - left, offset[1] - top))  # fmt: skip
        image.paste(Image.fromarray((pixels + 0.5).astype(np.uint8)), (left, top))
    draw = ImageDraw.Draw(image)
    colour_name = str(attributes["colour"])
    main = COLOURS[colour_name]
    second_name = str(attributes.get("secondary_colour") or colour_name)
    line = max(1, round(1.1 * scale))
    dark = _shade(main, _OUTLINE_DARK) if luminance(colour_name) > 0.15 else (85, 85, 90)
    material = attributes.get("material")
    edge = _STITCH if material == "denim" else dark
    if shape.waistband is not None:
        x1, y1, x2, y2 = shape.waistband
        box = [x1 * scale + offset[0], y1 * scale + offset[1], x2 * scale + offset[0], y2 * scale + offset[1]]
        draw.rectangle(box, fill=_shade(main, 0.8), outline=edge, width=1)
    for part in shape.parts:
        draw.polygon(_to_px(part, scale, offset), outline=edge, width=line)
    for flap in shape.collar:
        draw.polygon(_to_px(flap, scale, offset), fill=_shade(main, 1.12), outline=dark, width=line)
    for x1, y1, x2, y2 in shape.pockets:
        box = [x1 * scale + offset[0], y1 * scale + offset[1], x2 * scale + offset[0], y2 * scale + offset[1]]
        draw.rectangle(box, fill=_shade(main, 0.86), outline=edge, width=line)
        draw.line([box[0], box[1] + 4 * scale, box[2], box[1] + 4 * scale], fill=edge, width=line)
    details = set(attributes.get("details") or ())
    if shape.fastener is not None:
        x, head, foot = shape.fastener
        px = x * scale + offset[0]
        if "zip" in details:
            draw.line([px, head * scale + offset[1], px, foot * scale + offset[1]], fill=(190, 190, 196),
                      width=max(2, round(2.2 * scale)))  # fmt: skip
            for y in np.arange(head, foot, 3.0):
                py = y * scale + offset[1]
                draw.line([px - 2.2 * scale, py, px + 2.2 * scale, py], fill=(120, 120, 126), width=1)
            pull = [
                px - 2.5 * scale,
                head * scale + offset[1],
                px + 2.5 * scale,
                (head + 8) * scale + offset[1],
            ]
            draw.rectangle(pull, fill=(210, 210, 215), outline=(90, 90, 96))
        if "buttons" in details:
            button = _contrast(colour_name) if second_name == colour_name else COLOURS[second_name]
            radius = 3.0 * scale
            for y in np.linspace(head + 4, foot - 4, max(2, int((foot - head) // 20) + 1)):
                py = y * scale + offset[1]
                bx = px + (5 * scale if "zip" in details else 0.0)
                draw.ellipse([bx - radius, py - radius, bx + radius, py + radius], fill=button, outline=dark)
    if shape.logo is not None:
        lx, ly = shape.logo[0] * scale + offset[0], shape.logo[1] * scale + offset[1]
        r = 7.0 * scale
        badge = COLOURS[second_name] if second_name != colour_name else _contrast(colour_name)
        draw.ellipse([lx - r, ly - r, lx + r, ly + r], fill=badge)
        mark = _contrast(second_name) if second_name != colour_name else main
        draw.polygon(
            [(lx, ly - 0.6 * r), (lx + 0.55 * r, ly + 0.4 * r), (lx - 0.55 * r, ly + 0.4 * r)], fill=mark
        )
    for cut in shape.inner:
        points = _to_px(cut, scale, offset)
        if inner is None:
            draw_mask.polygon(points, fill=0)
        else:
            draw.polygon(points, fill=inner, outline=dark, width=line)
    rgba = image.convert("RGBA")
    rgba.putalpha(mask)
    return Layer(rgba=rgba, shape=shape)


def z_order(category: str) -> int:
    """Painting order on a body: bottoms first, then tops and dresses, outwear last."""
    if category in BOTTOMS:
        return 0
    if category in OUTWEAR:
        return 2
    return 1


@dataclass
class Dressed:
    """A painted figure: ``image`` RGBA (transparent around the figure), ``labels`` (0 or 1-based garment index),
    ``full`` (each garment's own mask before anything was painted over it), and the layers."""

    image: Image.Image
    labels: np.ndarray
    full: list[np.ndarray]
    layers: list[Layer]


def paint_figure(
    garments: Sequence[Garment],
    *,
    body: Body | None,
    scale: float,
    bag: tuple[tuple[int, int, int], bool] | None,
) -> Dressed:
    """Paint the garments (given order = label order; painted in :func:`z_order`) on a body, or alone.

    ``body`` ``None`` paints the garments alone (a consumer photo of a single item lying on a surface).
    ``bag`` is ``(colour, on_left)``: a shoulder bag in front of the figure, its strap across the torso.
    """
    size = (round(FRAME[0] * scale), round(FRAME[1] * scale))
    offset = (0.0, 0.0)
    canvas = Image.new("RGBA", size, (0, 0, 0, 0))
    labels = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    if body is not None:
        parts = body_parts()
        for poly in parts["skin"] + parts["head"]:
            draw.polygon(_to_px(poly, scale, offset), fill=(*body.skin, 255))
        for poly in parts["hair"]:
            draw.polygon(_to_px(poly, scale, offset), fill=(*body.hair, 255))
        for poly in parts["shoes"]:
            draw.polygon(_to_px(poly, scale, offset), fill=(*body.shoes, 255))
    order = sorted(range(len(garments)), key=lambda i: (z_order(str(garments[i].attributes["category"])), i))
    layers: list[Layer | None] = [None] * len(garments)
    full: list[np.ndarray] = [np.zeros((size[1], size[0]), dtype=bool)] * len(garments)
    for index in order:
        garment = garments[index]
        inner = None if body is not None else _shade(COLOURS[str(garment.attributes["colour"])], 0.45)
        layer = paint_garment(garment, size=size, scale=scale, offset=offset, inner=inner)
        layers[index] = layer
        alpha = layer.rgba.getchannel("A")
        full[index] = np.asarray(alpha) > 127
        canvas.alpha_composite(layer.rgba)
        labels.paste(index + 1, mask=alpha.point(lambda a: 255 if a > 127 else 0))
    occluder = Image.new("L", size, 0)
    occ_draw = ImageDraw.Draw(occluder)
    if body is not None and body.arm_across:
        arm = _to_px(forearm_across(), scale, offset)
        sleeve = [g for g in garments if str(g.attributes.get("sleeve")) == "long"]
        colour = COLOURS[str(sleeve[-1].attributes["colour"])] if sleeve else body.skin
        draw.polygon(arm, fill=(*colour, 255))
        occ_draw.polygon(arm, fill=255)
        hand = (90.0 * scale, 182.0 * scale)
        r = 8.0 * scale
        draw.ellipse([hand[0] - r, hand[1] - r, hand[0] + r, hand[1] + r], fill=(*body.skin, 255))
        occ_draw.ellipse([hand[0] - r, hand[1] - r, hand[0] + r, hand[1] + r], fill=255)
    if bag is not None:
        colour, on_left = bag
        x = 32.0 if on_left else 132.0
        box = [x * scale, 170.0 * scale, (x + 40.0) * scale, 208.0 * scale]
        strap = [(x + 20.0) * scale, 172.0 * scale, (200.0 - x - 20.0 - 18.0) * scale, 70.0 * scale]
        draw.line(strap, fill=(*_shade(colour, 0.7), 255), width=max(2, round(3 * scale)))
        occ_draw.line(strap, fill=255, width=max(2, round(3 * scale)))
        draw.rounded_rectangle(
            box, radius=6 * scale, fill=(*colour, 255), outline=(*_shade(colour, 0.6), 255)
        )
        occ_draw.rounded_rectangle(box, radius=6 * scale, fill=255)
    label_array = np.asarray(labels).copy()
    label_array[np.asarray(occluder) > 0] = 0
    return Dressed(image=canvas, labels=label_array, full=full, layers=[layer for layer in layers if layer])
