"""The garment world's attribute vocabularies and the caption sentence written from an attribute dict.

Every rendered garment is fully described by one attribute dict with the stable keys of :data:`ATTRIBUTE_KEYS`
(``category``, ``colour``, ``secondary_colour``, ``pattern``, ``neckline``, ``length``, ``sleeve``, ``details``,
``material``). The renderer draws exactly what the dict says, the truth file stores it, and :func:`describe`
turns it into words. :func:`describe` is shared by the pretraining alt-texts (from the truth) and by model
captioners (from *predicted* attributes), so a caption's wording never tells which of the two wrote it.

The category names are DeepFashion2's 13, in its id order (``CATEGORIES[i]`` has id ``i + 1``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from capret.errors import DataError

__all__ = [
    "ATTRIBUTE_KEYS",
    "BOTTOMS",
    "CATEGORIES",
    "COLOURS",
    "DETAILS",
    "DRESSES",
    "LENGTHS",
    "MATERIALS",
    "NECKLINES",
    "OUTWEAR",
    "PATTERNS",
    "SLEEVES",
    "TOPS",
    "category_id",
    "describe",
    "luminance",
    "sleeve_of",
]

#: DeepFashion2's categories in id order 1..13.
CATEGORIES: tuple[str, ...] = (
    "short sleeve top", "long sleeve top", "short sleeve outwear", "long sleeve outwear", "vest", "sling",
    "shorts", "trousers", "skirt", "short sleeve dress", "long sleeve dress", "vest dress", "sling dress",
)  # fmt: skip
#: Garments worn on the torso only, on top of a torso garment, on the legs, and from shoulder to leg.
TOPS: tuple[str, ...] = ("short sleeve top", "long sleeve top", "vest", "sling")
OUTWEAR: tuple[str, ...] = ("short sleeve outwear", "long sleeve outwear")
BOTTOMS: tuple[str, ...] = ("shorts", "trousers", "skirt")
DRESSES: tuple[str, ...] = ("short sleeve dress", "long sleeve dress", "vest dress", "sling dress")

#: Named palette (sRGB). Chosen far apart in hue and lightness so a name is recoverable from pixels under the
#: consumer photos' white-balance shifts, yet with near pairs (navy/blue, burgundy/red, beige/white) that make
#: fine distinctions matter.
COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 30),
    "white": (238, 238, 232),
    "grey": (128, 128, 128),
    "navy": (28, 40, 96),
    "blue": (40, 100, 200),
    "light blue": (140, 185, 230),
    "red": (200, 30, 40),
    "burgundy": (110, 20, 45),
    "pink": (240, 140, 180),
    "orange": (240, 130, 30),
    "yellow": (240, 210, 50),
    "beige": (215, 195, 160),
    "brown": (110, 70, 40),
    "green": (40, 140, 60),
    "olive": (110, 115, 45),
    "purple": (110, 50, 150),
}
PATTERNS: tuple[str, ...] = ("solid", "horizontal stripes", "vertical stripes", "checks", "dots", "print")
NECKLINES: tuple[str, ...] = ("crew neck", "v-neck", "square neck", "collar")
LENGTHS: tuple[str, ...] = ("cropped", "regular", "long")
SLEEVES: tuple[str, ...] = ("short", "long", "none", "straps")
DETAILS: tuple[str, ...] = ("buttons", "pockets", "zip", "logo")
MATERIALS: tuple[str, ...] = ("cotton", "denim", "knit", "leather", "satin")
ATTRIBUTE_KEYS: tuple[str, ...] = (
    "category", "colour", "secondary_colour", "pattern", "neckline", "length", "sleeve", "details", "material",
)  # fmt: skip

_SLEEVE_OF = {
    "short sleeve top": "short", "long sleeve top": "long", "short sleeve outwear": "short",
    "long sleeve outwear": "long", "vest": "none", "sling": "straps", "short sleeve dress": "short",
    "long sleeve dress": "long", "vest dress": "none", "sling dress": "straps",
}  # fmt: skip
#: How a pattern reads as an adjective before the noun, and as a "with ..." phrase (``{c}`` = second colour).
_PATTERN_ADJ = {
    "horizontal stripes": "striped", "vertical stripes": "pinstriped", "checks": "checked",
    "dots": "polka dot", "print": "printed",
}  # fmt: skip
_PATTERN_WITH = {
    "horizontal stripes": "{c} horizontal stripes", "vertical stripes": "{c} vertical stripes",
    "checks": "a {c} check", "dots": "{c} dots", "print": "a {c} print",
}  # fmt: skip
_DETAIL_PHRASE = {"buttons": "buttons", "pockets": "pockets", "zip": "a zip", "logo": "a logo"}
_LENGTH_ADJ = {
    "top": {"cropped": "cropped", "regular": "", "long": "longline"},
    "shorts": {"cropped": "short", "regular": "", "long": "knee-length"},
    "trousers": {"cropped": "cropped", "regular": "", "long": "full-length"},
    "skirt": {"cropped": "mini", "regular": "knee-length", "long": "maxi"},
    "dress": {"cropped": "mini", "regular": "knee-length", "long": "maxi"},
}
_SLEEVE_PHRASE = {
    "short": "short sleeves",
    "long": "long sleeves",
    "none": "no sleeves",
    "straps": "thin straps",
}
#: Category names that take no article ("black trousers", not "a black trousers").
_PLURAL = ("shorts", "trousers")
#: The template families of :func:`describe` when it is given a generator.
_STYLES = ("sentence", "list", "noun-first")


def category_id(name: str) -> int:
    """DeepFashion2 id (1..13) of a category name; an unknown name raises naming the valid ones."""
    try:
        return CATEGORIES.index(name) + 1
    except ValueError:
        raise DataError(f"unknown garment category {name!r}; valid: {', '.join(CATEGORIES)}") from None


def sleeve_of(category: str) -> str | None:
    """The sleeve kind a category implies (``None`` for bottoms, which have no sleeves to speak of)."""
    return _SLEEVE_OF.get(category)


def luminance(colour: str) -> float:
    """Relative luminance in [0, 1] of a palette colour (Rec. 709 weights on sRGB), for "darker"/"lighter"."""
    r, g, b = COLOURS[colour]
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255.0


def _length_family(category: str) -> str:
    if category in ("shorts", "trousers", "skirt"):
        return category
    return "dress" if category in DRESSES else "top"


def _check(attributes: Mapping[str, Any]) -> None:
    unknown = sorted(set(attributes) - set(ATTRIBUTE_KEYS))
    if unknown:
        raise DataError(f"unknown attribute keys {unknown}; valid keys: {', '.join(ATTRIBUTE_KEYS)}")
    vocab: dict[str, Sequence[str]] = {
        "category": CATEGORIES, "colour": tuple(COLOURS), "secondary_colour": tuple(COLOURS),
        "pattern": PATTERNS, "neckline": NECKLINES, "length": LENGTHS, "sleeve": SLEEVES, "material": MATERIALS,
    }  # fmt: skip
    for key, valid in vocab.items():
        value = attributes.get(key)
        if value is not None and value not in valid:
            raise DataError(f"attribute {key!r} has value {value!r}; valid: {', '.join(valid)}")
    for detail in attributes.get("details") or ():
        if detail not in DETAILS:
            raise DataError(f"attribute 'details' holds {detail!r}; valid: {', '.join(DETAILS)}")


def _phrases(attributes: Mapping[str, Any]) -> dict[str, str]:
    """One short phrase per mentionable attribute ("navy", "white horizontal stripes", "a v-neck", ...)."""
    category = attributes.get("category")
    pattern = attributes.get("pattern")
    second = attributes.get("secondary_colour")
    out: dict[str, str] = {}
    if attributes.get("colour"):
        out["colour"] = str(attributes["colour"])
    if pattern and pattern != "solid":
        out["pattern"] = " ".join(_PATTERN_WITH[pattern].format(c=second or "").split())
    elif pattern == "solid":
        out["pattern"] = "plain"
    if attributes.get("neckline") and (category is None or category not in BOTTOMS):
        neck = str(attributes["neckline"])
        out["neckline"] = "a collar" if neck == "collar" else f"a {neck}"
    length = attributes.get("length")
    if length:
        family = _length_family(category) if category else "top"
        adjective = _LENGTH_ADJ[family][length]
        if adjective:  # a regular top, shorts or trousers is the default and goes unsaid
            out["length"] = adjective
    sleeve = attributes.get("sleeve")
    if sleeve and (category is None or sleeve_of(category) != sleeve):
        out["sleeve"] = _SLEEVE_PHRASE[sleeve]
    details = [d for d in DETAILS if d in (attributes.get("details") or ())]
    if details:
        words = [_DETAIL_PHRASE[d] for d in details]
        out["details"] = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    if attributes.get("material"):
        out["material"] = str(attributes["material"])
    return out


def _sentence(attributes: Mapping[str, Any], phrases: dict[str, str], keys: Sequence[str]) -> str:
    """``"a navy cropped knit short sleeve top with white horizontal stripes, a v-neck and pockets"``."""
    category = attributes.get("category") or "garment"
    before: list[str] = []
    after: list[str] = []
    for key in keys:
        if key not in phrases:
            continue
        text = phrases[key]
        if key == "colour" or key == "material":
            before.append(text)
        elif key == "length":
            before.append(text)
        elif key == "pattern":
            if text != "plain":
                after.append(text)
            else:
                before.append(text)
        else:
            after.append(text)
    head = " ".join([*before, category])
    if category not in _PLURAL:
        head = f"{'an' if head[:1] in 'aeiou' else 'a'} {head}"
    if not after:
        return head
    tail = after[0] if len(after) == 1 else ", ".join(after[:-1]) + " and " + after[-1]
    return f"{head} with {tail}"


def describe(
    attributes: Mapping[str, Any],
    *,
    rng: np.random.Generator | None = None,
    order: Sequence[str] | None = None,
) -> str:
    """A caption of the garment an attribute dict describes.

    Without ``rng`` the wording is canonical: one sentence, attributes in :data:`ATTRIBUTE_KEYS` order (the
    captioners' default, so two captions differ only where the attributes do). With ``rng`` the wording varies
    the way alt-texts do: a sentence, a comma list or the noun first, attributes in shuffled order. ``order``
    names the attribute keys to mention and their order (others are left out; ``category`` is always the noun).
    Keys whose value is ``None`` or empty are skipped, so a captioner leaves out what it is unsure of. The
    sleeve is only mentioned when the category name does not already say it.
    """
    _check(attributes)
    phrases = _phrases(attributes)
    if order is not None:
        bad = [k for k in order if k not in ATTRIBUTE_KEYS]
        if bad:
            raise DataError(
                f"describe(order=...) names unknown keys {bad}; valid: {', '.join(ATTRIBUTE_KEYS)}"
            )
        keys = [k for k in order if k != "category"]
    else:
        keys = [k for k in ATTRIBUTE_KEYS if k != "category"]
        if rng is not None:
            keys = [keys[i] for i in rng.permutation(len(keys))]
    style = "sentence" if rng is None else _STYLES[int(rng.integers(len(_STYLES)))]
    category = attributes.get("category") or "garment"
    if style == "sentence":
        return _sentence(attributes, phrases, keys)
    parts = [phrases[k] for k in keys if k in phrases]
    if style == "list":
        return ", ".join([category, *parts])
    # noun-first: "short sleeve top in navy, with a v-neck"
    colour = phrases.get("colour")
    rest = [phrases[k] for k in keys if k in phrases and k != "colour"]
    head = f"{category} in {colour}" if colour else category
    return f"{head}, {', '.join(rest)}" if rest else head
