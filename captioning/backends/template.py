"""``template`` backend: no model; deterministic dialogue answered from the annotation and the pixels.

It exists so that the whole pipeline (and ``capret quickstart``) runs anywhere, offline and in
milliseconds, while writing records of exactly the same shape as a real VLM/LLM dialogue: it asks a fixed
sequence of attribute questions (skipping ones the annotation cannot answer), answers colour and background
questions from a named-colour histogram of the item's pixels, answers viewpoint/occlusion/size questions from
the DeepFashion2 annotation fields, answers what it cannot know (material) with "not sure", and summarises the
informative answers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from PIL import Image

from captioning.backends.base import CaptionBackend, register_backend
from captioning.colors import PALETTE_VERSION, colour_shares, dominant_colours
from captioning.text import is_uninformative
from captioning.types import QA, ChatRequest, Generation, ItemContext, VisualQuery

__all__ = ["TemplateBackend"]

NOT_SURE = "Not sure."

#: (topic, question with {category}, the annotation attribute it needs or None)
TOPICS: list[tuple[str, str, str | None]] = [
    ("colour", "What colours does the {category} have?", None),
    ("pattern", "What pattern or print does the {category} have?", None),
    ("material", "What material does the {category} seem to be made of?", None),
    ("sleeves", "What kind of sleeves does the {category} have?", "sleeves"),
    ("viewpoint", "From which side is the {category} seen, and who is wearing it?", "viewpoint"),
    ("occlusion", "How much of the {category} is hidden by other things?", "occlusion"),
    ("size", "How large does the {category} appear in the photo?", "scale"),
    ("background", "What does the background around the {category} look like?", None),
]

_TOPIC_WORDS: list[tuple[str, re.Pattern[str]]] = [
    ("describe", re.compile(r"\bdescribe\b")),
    ("colour", re.compile(r"\bcolou?rs?\b")),
    ("pattern", re.compile(r"\b(pattern|print|stripe|plaid|floral)")),
    ("material", re.compile(r"\b(material|fabric|made of)\b")),
    ("sleeves", re.compile(r"\bsleeve")),
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


@register_backend("template")
class TemplateBackend(CaptionBackend):
    """Deterministic annotation + pixel statistics "dialogue"; see the module docstring."""

    name = "template"

    def __init__(self, *, min_colour_share: float = 0.15) -> None:
        self.min_colour_share = min_colour_share
        self._colour_cache: dict[tuple[str, int, int], tuple[list[str], list[str]]] = {}

    def describe(self) -> dict[str, Any]:
        return {"name": "template-v1", "palette": PALETTE_VERSION, "min_colour_share": self.min_colour_share}

    # --- pixels ------------------------------------------------------------------------------------------

    def _colours(self, image: Image.Image, context: ItemContext) -> tuple[list[str], list[str]]:
        """(garment colours, background colours) of the view, cached per item."""
        cache_key = (context.key, image.width, image.height)
        if cache_key in self._colour_cache:
            return self._colour_cache[cache_key]
        box = context.bbox_in_view or (0.0, 0.0, float(image.width), float(image.height))
        x1, y1, x2, y2 = (round(v) for v in box)
        x1, y1 = max(0, x1), max(0, y1)
        x2, y2 = min(image.width, max(x2, x1 + 1)), min(image.height, max(y2, y1 + 1))
        # Shrink the box by 10% per side: box corners are usually background or skin, not garment.
        dx, dy = (x2 - x1) // 10, (y2 - y1) // 10
        garment = dominant_colours(
            image.crop((x1 + dx, y1 + dy, x2 - dx, y2 - dy)), min_share=self.min_colour_share
        )
        background: list[str] = []
        box_area = (x2 - x1) * (y2 - y1)
        if image.width * image.height - box_area >= 0.05 * image.width * image.height:
            shares = colour_shares(_outside_box(image, (x1, y1, x2, y2)), max_side=2048)
            background = [n for n, s in shares.items() if s >= self.min_colour_share][:1]
        if len(self._colour_cache) > 4096:
            self._colour_cache.clear()
        self._colour_cache[cache_key] = (garment, background)
        return garment, background

    # --- VLM side -------------------------------------------------------------------------------------

    def _answer_one(self, query: VisualQuery) -> str:
        ctx = query.context
        attrs = ctx.attributes
        garment, background = self._colours(query.image, ctx)
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
            if len(garment) >= 2:
                return (
                    f"It shows several colours ({' and '.join(garment)}), so it may have a pattern or print."
                )
            return "It looks plain, in a single colour." if garment else NOT_SURE
        if topic == "sleeves":
            return _SLEEVES.get(str(attrs.get("sleeves")), NOT_SURE)
        if topic == "viewpoint":
            return _VIEWPOINT.get(int(attrs.get("viewpoint", 0) or 0), NOT_SURE)
        if topic == "occlusion":
            return _OCCLUSION.get(int(attrs.get("occlusion", 0) or 0), NOT_SURE)
        if topic == "size":
            text = _SCALE.get(int(attrs.get("scale", 0) or 0), NOT_SURE)
            if int(attrs.get("zoom_in", 0) or 0) >= 2 and text != NOT_SURE:
                text += " The photo is zoomed in, so part of it may be cut off."
            return text
        if topic == "background":
            return f"The background around it is mainly {background[0]}." if background else NOT_SURE
        return NOT_SURE  # material and anything else the pixels and annotation cannot tell

    def answer(self, queries: Sequence[VisualQuery], *, max_tokens: int) -> list[Generation]:
        return [Generation(text=self._answer_one(q)) for q in queries]

    # --- LLM side -------------------------------------------------------------------------------------

    @staticmethod
    def _next_question(context: ItemContext, dialogue: Sequence[QA]) -> str:
        asked = {topic_of(qa.q, context.category) for qa in dialogue}
        category = context.category or "clothing item"
        for topic, question, needs in TOPICS:
            if topic in asked or (needs is not None and not context.attributes.get(needs)):
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
    import numpy as np

    arr = np.asarray(image.convert("RGB"))
    mask = np.ones(arr.shape[:2], dtype=bool)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = False
    pixels = arr[mask]
    pixels = pixels[:: max(1, len(pixels) // 1024)]  # a uniform subsample is enough for a histogram
    if pixels.size == 0:
        return Image.new("RGB", (0, 0))
    return Image.fromarray(pixels.reshape(1, -1, 3))
