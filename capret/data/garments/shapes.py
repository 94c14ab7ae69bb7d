"""Garment silhouettes as polygons in one body frame, so a garment drawn alone and on a person line up.

The frame is a standing, frontal figure :data:`FRAME` units wide and tall (head at the top, shoulders at
y = 70, waist at 160, hips at 190, crotch at 215, knees at 280, ankles at 370). A silhouette is what a person
names a garment by (Ge et al., DeepFashion2, Fig. 2 draws the same 13 outlines): sleeves short or long along
the arm or none; thin straps for slings; an open front for outwear without a fastener; a leg split for shorts
and trousers with the hem at the thigh or the ankle; a skirt's flare; a dress's bodice running into a skirt.
The neckline cut, the fastener line and the pocket and logo anchors are returned beside the outline so the
painter draws details where they belong.

Everything here is geometry in frame units; :mod:`.paint` turns it into pixels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from capret.data.garments.vocab import BOTTOMS, DRESSES, OUTWEAR, sleeve_of

__all__ = ["FRAME", "Body", "Silhouette", "body_parts", "silhouette"]

#: (width, height) of the body frame in units.
FRAME: tuple[float, float] = (200.0, 400.0)
_CX = 100.0
#: hem heights (frame y) per length, per garment family
_HEMS = {
    "top": {"cropped": 148.0, "regular": 192.0, "long": 222.0},
    "sling": {"cropped": 166.0, "regular": 200.0, "long": 228.0},
    "outwear": {"cropped": 172.0, "regular": 198.0, "long": 232.0},
    "shorts": {"cropped": 240.0, "regular": 258.0, "long": 285.0},
    "trousers": {"cropped": 318.0, "regular": 352.0, "long": 372.0},
    "skirt": {"cropped": 232.0, "regular": 280.0, "long": 345.0},
    "dress": {"cropped": 236.0, "regular": 282.0, "long": 350.0},
}
_SHOULDER_Y, _WAIST_Y, _HIP_Y, _CROTCH_Y = 70.0, 160.0, 190.0, 215.0
_NECK_Y = 64.0
_SHOULDER = np.array([62.0, 70.0])  # the left shoulder joint; the right one mirrors it
_WRIST = np.array([42.0, 198.0])


@dataclass(frozen=True)
class Silhouette:
    """A garment's geometry in frame units.

    Attributes:
        parts: filled polygons whose union is the garment (torso, sleeves, straps, legs, skirt).
        inner: polygons drawn in the garment's *inside* colour or in what lies beneath (the open front of
            outwear, the neckline cut), so the garment reads as hollow.
        collar: polygons of collar flaps drawn over the garment.
        fastener: ``(x, y_top, y_bottom)`` of the centre line where buttons or a zip go.
        pockets: pocket rectangles ``(x1, y1, x2, y2)``.
        logo: centre ``(x, y)`` of the chest or hip logo.
        straps: thick lines ``((x1, y1), (x2, y2), width)`` (sling straps, waistband).
        open_front: whether the front is open (outwear without a fastener).
    """

    parts: list[np.ndarray]
    inner: list[np.ndarray] = field(default_factory=list)
    collar: list[np.ndarray] = field(default_factory=list)
    fastener: tuple[float, float, float] | None = None
    pockets: list[tuple[float, float, float, float]] = field(default_factory=list)
    logo: tuple[float, float] | None = None
    waistband: tuple[float, float, float, float] | None = None
    open_front: bool = False

    def bounds(self) -> tuple[float, float, float, float]:
        """``(x1, y1, x2, y2)`` of the parts in frame units."""
        points = np.concatenate(self.parts)
        x1, y1 = points.min(axis=0)
        x2, y2 = points.max(axis=0)
        return float(x1), float(y1), float(x2), float(y2)

    def outline(self) -> np.ndarray:
        """The first (largest) part: the polygon landmarks are spread along."""
        return self.parts[0]


def _mirror(points: np.ndarray) -> np.ndarray:
    out = np.array(points, dtype=np.float64)
    out[:, 0] = 2 * _CX - out[:, 0]
    return out[::-1]


def _sleeve(kind: str, *, width: float, reach: float | None = None) -> list[np.ndarray]:
    """Left and right sleeves along the arm from the shoulder: short ends above the elbow, long at the wrist."""
    if kind not in ("short", "long"):
        return []
    axis = _WRIST - _SHOULDER
    length = float(np.linalg.norm(axis))
    direction = axis / length
    normal = np.array([-direction[1], direction[0]])  # points outwards (to the left) for the left arm
    if normal[0] > 0:
        normal = -normal
    if reach is None:
        reach = 0.34 if kind == "short" else 0.97
    end = _SHOULDER + axis * reach
    half_end = width * (0.62 if kind == "short" else 0.42)
    left = np.array(
        [
            _SHOULDER + np.array([4.0, -4.0]),
            _SHOULDER + normal * width * 0.55,
            end + normal * half_end,
            end - normal * half_end,
            np.array([67.0, 104.0]),
        ]
    )
    return [left, _mirror(left)]


def _torso(*, hem: float, flare: float, shoulder_inset: float, neck_half: float) -> np.ndarray:
    """Left half from the neck to the hem, mirrored: shoulders, armpit, waist, then flaring to the hem."""
    hem_half = 38.0 + 6.0 * flare + max(0.0, hem - _HIP_Y) * 0.12
    waist_half = 31.0 + 3.0 * flare if hem >= _WAIST_Y else 34.0
    half = [
        (_CX - neck_half, _NECK_Y),
        (62.0 + shoulder_inset, _SHOULDER_Y - 1.0),
        (64.0 + shoulder_inset * 0.2, 104.0),
        (_CX - waist_half, min(_WAIST_Y, hem)),
    ]
    if hem > _WAIST_Y + 2.0:
        half.append((_CX - hem_half, hem))
    left = np.array(half)
    return np.concatenate([left, _mirror(left)])


def _neck_hole(neckline: str | None, *, neck_half: float) -> list[np.ndarray]:
    if neckline is None:
        return []
    if neckline == "v-neck":
        return [
            np.array([(_CX - neck_half, _NECK_Y - 1), (_CX + neck_half, _NECK_Y - 1), (_CX, _NECK_Y + 34)])
        ]
    if neckline == "square neck":
        return [np.array([(_CX - neck_half, _NECK_Y - 1), (_CX + neck_half, _NECK_Y - 1),
                          (_CX + neck_half, _NECK_Y + 20), (_CX - neck_half, _NECK_Y + 20)])]  # fmt: skip
    t = np.linspace(0, np.pi, 12)
    depth = 11.0 if neckline == "crew neck" else 7.0
    return [np.stack([_CX - neck_half * np.cos(t), _NECK_Y - 1 + depth * np.sin(t)], axis=1)]


def _collar(neck_half: float) -> list[np.ndarray]:
    left = np.array([(_CX - neck_half - 3, _NECK_Y - 3), (_CX - 1, _NECK_Y + 8), (_CX - 4, _NECK_Y + 20),
                     (_CX - neck_half - 6, _NECK_Y + 12)])  # fmt: skip
    return [left, _mirror(left)]


def _lapels(neck_half: float, *, deep: bool) -> list[np.ndarray]:
    """Outwear's turned-down lapels: a wide notched flap each side of the front opening."""
    bottom = _NECK_Y + (52.0 if deep else 38.0)
    left = np.array([(_CX - neck_half - 2, _NECK_Y - 3), (_CX - 3, bottom), (_CX - 16, bottom - 12),
                     (_CX - 22, _NECK_Y + 16), (_CX - neck_half - 12, _NECK_Y + 6)])  # fmt: skip
    return [left, _mirror(left)]


def _legs(*, hem: float, flare: float) -> np.ndarray:
    """Shorts or trousers: waist, hips, the outer seam down to the hem, the inner seam up to the crotch.

    Shorts' legs open outwards from a high crotch (a clear notch between them); trouser legs run down
    separately with a wide gap between them.
    """
    if hem < 300:  # shorts
        crotch = 206.0
        outer, inner = 57.0 - 5.0 * flare, 91.0 - 2.0 * flare
    else:
        crotch = _CROTCH_Y
        centre, half = 75.0, 11.0 + 5.0 * flare
        outer, inner = centre - half - 6.0 * flare, centre + half - 2.0 * flare
    left = np.array([(_CX - 31.0, _WAIST_Y), (62.0, _HIP_Y), (outer, hem), (inner, hem)])
    return np.concatenate([left, [(_CX, crotch)], _mirror(left)])


def _skirt(*, top: float, top_half: float, hem: float, flare: float) -> np.ndarray:
    hem_half = 40.0 + 34.0 * flare + (hem - top) * 0.08
    return np.array(
        [(_CX - top_half, top), (_CX + top_half, top), (_CX + hem_half, hem), (_CX - hem_half, hem)]
    )


def _sling_bodice(hem: float, flare: float) -> tuple[np.ndarray, list[np.ndarray]]:
    top = 96.0
    half = [(76.0, top - 6.0), (70.0, 108.0), (_CX - 30.0 - 3.0 * flare, min(_WAIST_Y, hem))]
    if hem > _WAIST_Y:
        half.append((_CX - 38.0 - 6.0 * flare, hem))
    left = np.array(half)
    body = np.concatenate([left, _mirror(left)])
    strap = np.array(
        [(77.0, top - 5.0), (80.0, _SHOULDER_Y - 2.0), (83.0, _SHOULDER_Y - 2.0), (80.0, top - 5.0)]
    )
    return body, [strap, _mirror(strap)]


def silhouette(attributes: Mapping[str, Any], *, flare: float = 0.5) -> Silhouette:
    """The silhouette of a garment from its attributes (``category``, ``length``, ``neckline``, ``details``).

    ``flare`` in [0, 1] is a per-identity shape parameter that is not an attribute (how wide a skirt or a
    trouser leg opens, how boxy a top is): it keeps identities of the same attributes from being pixel twins.
    """
    category = str(attributes["category"])
    length = str(attributes.get("length") or "regular")
    details = set(attributes.get("details") or ())
    neckline = attributes.get("neckline")
    sleeve = sleeve_of(category)
    flare = float(np.clip(flare, 0.0, 1.0))
    neck_half = 12.0
    if category in BOTTOMS:
        family = category
        hem = _HEMS[family][length]
        if category == "skirt":
            body = _skirt(top=_WAIST_Y, top_half=31.0, hem=hem, flare=flare)
            pockets = [(74.0, 170.0, 86.0, 184.0), (114.0, 170.0, 126.0, 184.0)]
            fastener = (_CX, _WAIST_Y + 6, hem - 6)
        else:
            body = _legs(hem=hem, flare=flare)
            pockets = [(66.0, 168.0, 78.0, 184.0), (122.0, 168.0, 134.0, 184.0)]
            fastener = (_CX, _WAIST_Y + 6, _CROTCH_Y - 10)
        return Silhouette(
            parts=[body],
            fastener=fastener if details & {"buttons", "zip"} else None,
            pockets=pockets if "pockets" in details else [],
            logo=(118.0, 180.0) if "logo" in details else None,
            waistband=(_CX - 31.0, _WAIST_Y, _CX + 31.0, _WAIST_Y + 7.0),
        )
    is_outwear = category in OUTWEAR
    is_dress = category in DRESSES
    family = "outwear" if is_outwear else "dress" if is_dress else "sling" if sleeve == "straps" else "top"
    hem = _HEMS[family][length]
    torso_hem = _WAIST_Y if is_dress else hem
    parts: list[np.ndarray] = []
    inner: list[np.ndarray] = []
    collar: list[np.ndarray] = []
    if sleeve == "straps":
        body, straps = _sling_bodice(torso_hem, flare if not is_dress else 0.2)
        parts = [body, *straps]
        neckline = None
    else:
        inset = 9.0 if sleeve == "none" else 0.0
        width = 28.0 if is_outwear else 22.0
        if is_outwear:  # boxy, with dropped shoulders and elbow-length short sleeves
            inset, body_flare, reach = -4.0, 0.7, (0.5 if sleeve == "short" else 1.0)
        else:
            body_flare, reach = (0.2 if is_dress else flare), None
        body = _torso(hem=torso_hem, flare=body_flare, shoulder_inset=inset, neck_half=neck_half)
        parts = [body, *_sleeve(sleeve or "none", width=width, reach=reach)]
        if is_outwear:
            collar = _lapels(neck_half, deep=neckline == "v-neck")
        elif neckline == "collar":
            collar = _collar(neck_half)
        inner = _neck_hole(neckline, neck_half=neck_half)
    if is_dress:
        top_half = 31.0 + 0.6
        parts.insert(1, _skirt(top=_WAIST_Y - 1.0, top_half=top_half, hem=hem, flare=flare))
    closed = bool(details & {"buttons", "zip"})
    open_front = is_outwear and "zip" not in details  # outwear is worn open unless zipped
    if open_front:
        inner.append(
            np.array([(_CX - 6, _NECK_Y + 6), (_CX + 6, _NECK_Y + 6), (_CX + 11, hem), (_CX - 11, hem)])
        )
    if is_outwear:
        fastener = (_CX - (16.0 if open_front else 0.0), _NECK_Y + 40, hem - 4)
        pockets = [(70.0, hem - 42, 88.0, hem - 22), (112.0, hem - 42, 130.0, hem - 22)]
    else:
        top_y = 100.0 if sleeve == "straps" else _NECK_Y + 14
        fastener = (
            _CX,
            top_y,
            top_y + (60.0 if "zip" in details and not is_dress else torso_hem - top_y - 8),
        )
        pockets = [(72.0, 96.0, 88.0, 114.0)] if not is_dress else [(68.0, 178.0, 82.0, 192.0),
                                                                    (118.0, 178.0, 132.0, 192.0)]  # fmt: skip
    return Silhouette(
        parts=parts,
        inner=inner,
        collar=collar,
        fastener=fastener if closed else None,
        pockets=pockets if "pockets" in details else [],
        logo=(116.0, 108.0) if "logo" in details else None,
        waistband=(_CX - 32.0, _WAIST_Y - 3, _CX + 32.0, _WAIST_Y + 3) if is_dress else None,
        open_front=open_front,
    )


@dataclass(frozen=True)
class Body:
    """The figure a consumer photo dresses: skin, hair and shoe colours, and the arm pose."""

    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    shoes: tuple[int, int, int]
    arm_across: bool  # one forearm crosses the front of the body (occludes the garments)


def body_parts() -> dict[str, list[np.ndarray]]:
    """The figure's polygons in frame units: ``skin`` (neck, arms, legs), ``head`` (a polygonal ellipse)."""
    t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    head = np.stack([_CX + 19 * np.cos(t), 38 + 24 * np.sin(t)], axis=1)
    hair = np.stack([_CX + 21 * np.cos(t[10:]), 34 + 24 * np.sin(t[10:])], axis=1)
    neck = np.array([(92.0, 56.0), (108.0, 56.0), (110.0, 72.0), (90.0, 72.0)])
    torso = _torso(hem=_HIP_Y, flare=0.0, shoulder_inset=0.0, neck_half=10.0)
    arm = np.array(
        [_SHOULDER + (4, -2), _SHOULDER + (-9, 4), _WRIST + (-6, 0), _WRIST + (6, 0), (70.0, 104.0)]
    )
    hand = np.stack([_WRIST[0] + 7 * np.cos(t), _WRIST[1] + 10 + 9 * np.sin(t)], axis=1)
    leg = np.array([(69.0, _WAIST_Y), (_CX - 1, _WAIST_Y), (_CX - 3, _CROTCH_Y), (92.0, 368.0), (76.0, 368.0),
                    (64.0, _HIP_Y)])  # fmt: skip
    shoe = np.array([(72.0, 364.0), (94.0, 364.0), (96.0, 382.0), (64.0, 382.0)])
    return {
        "skin": [neck, torso, arm, _mirror(arm), hand, _mirror(hand), leg, _mirror(leg)],
        "head": [head],
        "hair": [hair],
        "shoes": [shoe, _mirror(shoe)],
    }


def forearm_across() -> np.ndarray:
    """A forearm crossing the waist from the right elbow (drawn over the garments, an occluder)."""
    return np.array([(146.0, 140.0), (158.0, 150.0), (96.0, 186.0), (84.0, 176.0)])
