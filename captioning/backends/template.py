"""``template`` backend: no model; a deterministic dialogue answered from the item's pixels and box.

It exists so that the whole pipeline (and ``capret quickstart``) runs anywhere, offline and in
milliseconds, while writing records of exactly the same shape as a real VLM/LLM dialogue: it asks a fixed
sequence of attribute questions and answers each from measurements of the view it is shown: colours from a
named-colour histogram of the garment pixels, pattern and texture from gradient statistics (how strong, how
concentrated in one orientation), shape from the box's aspect ratio, size from the box's share of the photo,
background from the pixels outside the box. The category named in the questions is the one the loop is given:
a model's prediction by default (sleeves follow from a predicted DeepFashion2 name such as "long sleeve top").
What pixels cannot tell (material) is answered "not sure". Viewpoint and occlusion questions are asked only
when the explicit oracle (``--oracle-attributes``) put annotation fields into the item's context.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from captioning.backends.base import CaptionBackend, register_backend
from captioning.category import sleeves_of
from captioning.colors import PALETTE_VERSION, colour_shares, dominant_colours
from captioning.text import is_uninformative
from captioning.types import QA, ChatRequest, Generation, ItemContext, VisualQuery

__all__ = ["TemplateBackend"]

NOT_SURE = "Not sure."

#: (topic, question with {category}, what the context must hold for it: None, "sleeves" (a category name that
#: implies sleeves) or an oracle attribute name)
TOPICS: list[tuple[str, str, str | None]] = [
    ("colour", "What colours does the {category} have?", None),
    ("pattern", "What pattern or print does the {category} have?", None),
    ("material", "What material does the {category} seem to be made of?", None),
    ("sleeves", "What kind of sleeves does the {category} have?", "sleeves"),
    ("shape", "What shape and length does the {category} have?", None),
    ("viewpoint", "From which side is the {category} seen, and who is wearing it?", "viewpoint"),
    ("occlusion", "How much of the {category} is hidden by other things?", "occlusion"),
    ("size", "How large does the {category} appear in the photo?", None),
    ("background", "What does the background around the {category} look like?", None),
]

_TOPIC_WORDS: list[tuple[str, re.Pattern[str]]] = [
    ("describe", re.compile(r"\bdescribe\b")),
    ("colour", re.compile(r"\bcolou?rs?\b")),
    ("pattern", re.compile(r"\b(pattern|print|stripe|plaid|floral)")),
    ("material", re.compile(r"\b(material|fabric|made of)\b")),
    ("sleeves", re.compile(r"\bsleeve")),
    ("shape", re.compile(r"\b(shape|length|long|tall)\b")),
    ("viewpoint", re.compile(r"\b(side|viewpoint|angle|wearing|worn)\b")),
    ("occlusion", re.compile(r"\b(hidden|occlu|covered|visible)")),
    ("size", re.compile(r"\b(large|size|zoom|close)\b")),
    ("background", re.compile(r"\bbackground\b")),
]

_VIEWPOINT = {
    1: "It is not worn by anyone; it is shown on its own.",
    2: "It is worn by a person and seen from the front.",
    3: "It is worn by a person and seen from the side or the back.",
}
_OCCLUSION = {
    1: "Almost all of it is visible.",
    2: "Part of it is hidden by other things.",
    3: "A large part of it is hidden by other things.",
}
_SCALE = {
    1: "It appears small in the photo.",
    2: "It takes up a moderate part of the photo.",
    3: "It fills most of the photo.",
}
#: Mean gradient magnitude (grey levels in [0, 1] per pixel of a 64-pixel tile) below which a surface is plain,
#: and above which it is a busy fine print; a share of the gradient energy in one orientation bin above
#: ``_LINEAR_SHARE`` means stripes or lines.
_PLAIN_ENERGY, _BUSY_ENERGY, _LINEAR_SHARE = 0.02, 0.08, 0.3
_TEXTURE_TILE, _ORIENTATIONS = 64, 8
_SLEEVES = {
    "short": "It has short sleeves.",
    "long": "It has long sleeves.",
    "none": "It has no sleeves.",
    "straps": "It has thin straps instead of sleeves.",
}


def topic_of(question: str, category: str = "") -> str | None:
    """The attribute a question is about (first matching keyword group), or None.

    The category name is removed first: "short sleeve top" must not make every question a sleeve question.
    """
    text = question.lower()
    if category:
        text = text.replace(category.lower(), " ")
    for topic, pattern in _TOPIC_WORDS:
        if pattern.search(text):
            return topic
    return None


def _colour_phrase(names: Sequence[str]) -> str:
    if not names:
        return ""
    if len(names) == 1:
        return f"mainly {names[0]}"
    return f"mainly {names[0]} with some {names[1]}"


@dataclass(frozen=True)
class _Measures:
    """What the template backend measured in one item's view."""

    garment: list[str]  # dominant colour names of the garment pixels
    background: list[str]  # dominant colour name outside the box (empty when the box fills the view)
    energy: float  # mean gradient magnitude of the garment tile
    linear_share: float  # share of the gradient energy in the strongest orientation bin


def _texture(crop: Image.Image) -> tuple[float, float]:
    """(mean gradient magnitude, share of the strongest of 8 unsigned orientation bins) of a garment crop."""
    grey = np.asarray(
        crop.convert("L").resize((_TEXTURE_TILE, _TEXTURE_TILE), Image.Resampling.BILINEAR), dtype=np.float64
    )
    gy, gx = np.gradient(grey / 255.0)
    magnitude = np.hypot(gx, gy)
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    bins = np.minimum((angle / np.pi * _ORIENTATIONS).astype(np.int64), _ORIENTATIONS - 1)
    hist = np.bincount(bins.ravel(), weights=magnitude.ravel(), minlength=_ORIENTATIONS)
    total = float(hist.sum())
    return float(magnitude.mean()), (float(hist.max()) / total if total > 0 else 0.0)


def _pattern_phrase(m: _Measures) -> str:
    if not m.garment:
        return NOT_SURE
    if m.energy < _PLAIN_ENERGY:
        if len(m.garment) >= 2:
            return f"It has large plain areas of {m.garment[0]} and {m.garment[1]}, like colour blocks."
        return "It looks plain, in a single colour."
    if m.linear_share >= _LINEAR_SHARE:
        return "It has a striped or linear pattern."
    if m.energy >= _BUSY_ENERGY:
        return "It has a busy, fine-grained print or texture."
    return "It has a visible pattern or texture."


def _shape_phrase(box: tuple[float, float, float, float] | None) -> str:
    if box is None:
        return NOT_SURE
    width, height = max(box[2] - box[0], 1e-6), max(box[3] - box[1], 1e-6)
    ratio = height / width
    if ratio >= 1.6:
        return "It is long and narrow, much taller than wide."
    if ratio >= 1.15:
        return "It is somewhat taller than wide."
    if ratio > 1 / 1.15:
        return "It is about as tall as it is wide."
    return "It is short and wide, wider than tall."


def _size_phrase(image_size: tuple[int, int] | None, box: tuple[float, float, float, float] | None) -> str:
    if image_size is None:
        return NOT_SURE
    if box is None:
        return "It fills the whole photo."
    width, height = image_size
    share = max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0) / max(width * height, 1)
    if share < 0.15:
        return "It appears small in the photo."
    if share < 0.5:
        return "It takes up a moderate part of the photo."
    return "It fills most of the photo."


@register_backend("template")
class TemplateBackend(CaptionBackend):
    """Deterministic pixel-statistics "dialogue"; see the module docstring."""

    name = "template"

    def __init__(self, *, min_colour_share: float = 0.15) -> None:
        self.min_colour_share = min_colour_share
        self._cache: dict[tuple[str, int, int], _Measures] = {}

    def describe(self) -> dict[str, Any]:
        return {"name": "template-v2", "palette": PALETTE_VERSION, "min_colour_share": self.min_colour_share}

    # --- pixels ------------------------------------------------------------------------------------------

    def _measure(self, image: Image.Image, context: ItemContext) -> _Measures:
        """Colours, texture and background of the view, cached per item."""
        cache_key = (context.key, image.width, image.height)
        if cache_key in self._cache:
            return self._cache[cache_key]
        box = context.bbox_in_view or (0.0, 0.0, float(image.width), float(image.height))
        x1, y1, x2, y2 = (round(v) for v in box)
        x1, y1 = max(0, x1), max(0, y1)
        x2, y2 = min(image.width, max(x2, x1 + 1)), min(image.height, max(y2, y1 + 1))
        # Shrink the box by 10% per side: box corners are usually background or skin, not garment.
        dx, dy = (x2 - x1) // 10, (y2 - y1) // 10
        inner = image.crop((x1 + dx, y1 + dy, x2 - dx, y2 - dy))
        garment = dominant_colours(inner, min_share=self.min_colour_share)
        background: list[str] = []
        box_area = (x2 - x1) * (y2 - y1)
        if image.width * image.height - box_area >= 0.05 * image.width * image.height:
            shares = colour_shares(_outside_box(image, (x1, y1, x2, y2)), max_side=2048)
            background = [n for n, s in shares.items() if s >= self.min_colour_share][:1]
        energy, linear_share = _texture(inner)
        if len(self._cache) > 4096:
            self._cache.clear()
        measures = _Measures(garment=garment, background=background, energy=energy, linear_share=linear_share)
        self._cache[cache_key] = measures
        return measures

    # --- VLM side -------------------------------------------------------------------------------------

    def _answer_one(self, query: VisualQuery) -> str:
        ctx = query.context
        attrs = ctx.attributes  # empty unless the explicit oracle filled it
        m = self._measure(query.image, ctx)
        garment = m.garment
        topic = topic_of(query.question, ctx.category)
        category = ctx.category or "clothing item"
        if topic == "describe":
            if not garment:
                return f"A {category}."
            extra = f" with some {garment[1]}" if len(garment) > 1 else ""
            return f"A {garment[0]} {category}{extra}."
        if topic == "colour":
            return f"It is {_colour_phrase(garment)}." if garment else NOT_SURE
        if topic == "pattern":
            return _pattern_phrase(m)
        if topic == "sleeves":
            return _SLEEVES.get(str(sleeves_of(ctx.category)), NOT_SURE)
        if topic == "shape":
            return _shape_phrase(ctx.bbox_in_image or ctx.bbox_in_view)
        if topic == "viewpoint":
            return _VIEWPOINT.get(int(attrs.get("viewpoint", 0) or 0), NOT_SURE)
        if topic == "occlusion":
            return _OCCLUSION.get(int(attrs.get("occlusion", 0) or 0), NOT_SURE)
        if topic == "size":
            if "scale" not in attrs:
                return _size_phrase(ctx.image_size, ctx.bbox_in_image)
            text = _SCALE.get(int(attrs.get("scale", 0) or 0), NOT_SURE)  # oracle: the annotated scale
            if int(attrs.get("zoom_in", 0) or 0) >= 2 and text != NOT_SURE:
                text += " The photo is zoomed in, so part of it may be cut off."
            return text
        if topic == "background":
            return f"The background around it is mainly {m.background[0]}." if m.background else NOT_SURE
        return NOT_SURE  # material and anything else the pixels cannot tell

    def answer(self, queries: Sequence[VisualQuery], *, max_tokens: int) -> list[Generation]:
        return [Generation(text=self._answer_one(q)) for q in queries]

    # --- LLM side -------------------------------------------------------------------------------------

    @staticmethod
    def _can_ask(context: ItemContext, needs: str | None) -> bool:
        if needs is None:
            return True
        if needs == "sleeves":
            return sleeves_of(context.category) is not None
        return bool(context.attributes.get(needs))

    @classmethod
    def _next_question(cls, context: ItemContext, dialogue: Sequence[QA]) -> str:
        asked = {topic_of(qa.q, context.category) for qa in dialogue}
        category = context.category or "clothing item"
        for topic, question, needs in TOPICS:
            if topic in asked or not cls._can_ask(context, needs):
                continue
            return question.format(category=category)
        return ""  # nothing left to ask: the loop ends this item's dialogue

    @staticmethod
    def _summary(context: ItemContext, dialogue: Sequence[QA]) -> str:
        by_topic = {topic_of(qa.q, context.category): qa.a for qa in dialogue if not is_uninformative(qa.a)}
        parts = []
        if "describe" in by_topic:
            parts.append(by_topic["describe"])
        elif "colour" in by_topic:
            parts.append(by_topic["colour"])
        for topic, _, _ in TOPICS:
            if topic != "colour" and topic in by_topic:
                parts.append(by_topic[topic])
        return " ".join(parts)

    @staticmethod
    def _edit(dialogue: Sequence[QA]) -> str:
        """A model-free "edited description": the description with the modification appended.

        It keeps the reply format a real LLM is asked for (``Edited Description: ...``), so the parser and the
        cache of the caption-then-rewrite pipeline run unchanged without a model.
        """
        if len(dialogue) != 2:
            return ""  # not an edit request: the caller's parser counts the fallback
        description = dialogue[0].a.strip().rstrip(".")
        modification = dialogue[1].a.strip().rstrip(".")
        joined = f"{description}, {modification}" if description else modification
        return f"Edited Description: {joined}."

    def ask(self, requests: Sequence[ChatRequest], *, max_tokens: int) -> list[Generation]:
        out = []
        for request in requests:
            if request.kind == "question":
                out.append(Generation(text=self._next_question(request.context, request.dialogue)))
            elif request.kind == "edit":
                out.append(Generation(text=self._edit(request.dialogue)))
            else:
                out.append(Generation(text=self._summary(request.context, request.dialogue)))
        return out


def _outside_box(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The pixels outside ``box`` as a one-row image (for the background histogram)."""
    arr = np.asarray(image.convert("RGB"))
    mask = np.ones(arr.shape[:2], dtype=bool)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = False
    pixels = arr[mask]
    pixels = pixels[:: max(1, len(pixels) // 1024)]  # a uniform subsample is enough for a histogram
    if pixels.size == 0:
        return Image.new("RGB", (0, 0))
    return Image.fromarray(pixels.reshape(1, -1, 3))
