"""The ``clip`` caption backend: a caption written by a model from pixels, by zero-shot choice over attributes.

A VLM would look at the garment and say what it sees. Our stand-in is the CLIP the package pretrains on the
garment world (``capret-train`` task ``clip``): for each attribute of the garment vocabulary
(:mod:`capret.data.garments.vocab`) it embeds one prompt per value and picks the value whose prompt is most
similar to the image (CLIP's zero-shot classification, Radford et al. 2021, Sec. 3.1.4), then writes the
sentence with the vocabulary's own :func:`~capret.data.garments.vocab.describe` — the function that wrote the
alt-texts the CLIP was trained on, so the prompts are in the words it learnt.

The choice is made in two stages. First the category, over the 13 DeepFashion2 names. Then every other
attribute, with prompts that name the chosen category (``describe({"category": c, attribute: v})``, e.g. "a
navy short sleeve top"), because the alt-texts almost always name the garment: colour (the 16 palette names),
pattern jointly with its second colour ("plain", or "white horizontal stripes" for each pattern x colour),
neckline (not for bottoms), length, the set of details (every subset of buttons/pockets/zip/logo, so "none" is
a choice too) and material. Prompt embeddings are cached by their text.

What the backend reads: the view's pixels and the item's box in it (``VisualQuery.image`` and
``ItemContext.bbox_in_view``). It never reads the context's ``category``, ``category_id`` or ``attributes``
(the explicit oracle's annotation fields), nor any truth file, so a default caption is a function of pixels.

The dialogue is one round: the VLM side answers the first question with the description, the LLM side asks no
further question and returns that description as the summary. Registered into the caption-backend registry
(``capret-caption --backend clip``, ``CaptionerSettings(backend="clip", options={"model": FOLDER})``) lazily:
the registry names this module, so ``captioning`` itself never imports a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any, TypedDict, Unpack

import torch
from PIL import Image

from capret.data.garments.vocab import (
    BOTTOMS,
    CATEGORIES,
    COLOURS,
    DETAILS,
    LENGTHS,
    MATERIALS,
    NECKLINES,
    PATTERNS,
    describe,
)
from capret.errors import ConfigError
from capret.models.clip_arch import load_clip_folder
from capret.models.clip_base import ClipBundle
from capret.models.clip_zeroshot import Box, class_embeddings, encode_pil_images, zero_shot_scores
from captioning.backends.base import CaptionBackend, register_backend
from captioning.backends.template import TemplateBackend
from captioning.types import ChatRequest, Generation, VisualQuery

__all__ = [
    "ATTRIBUTE_ORDER",
    "ClipAttributeDescriber",
    "ClipCaptionBackend",
    "DescriberOptions",
    "attribute_candidates",
]

#: the attributes chosen after the category, in the order they are chosen and written
ATTRIBUTE_ORDER: tuple[str, ...] = ("colour", "pattern", "neckline", "length", "details", "material")

Candidate = dict[str, Any]


def attribute_candidates(attribute: str, category: str) -> list[Candidate]:
    """The partial attribute dicts one zero-shot choice is made among, each naming ``category``.

    ``pattern`` comes with its second colour (a solid garment has none); ``details`` is a set, so every subset
    of :data:`~capret.data.garments.vocab.DETAILS` is one candidate; bottoms have no neckline (empty list).
    """
    base: Candidate = {"category": category}
    if attribute == "colour":
        return [{**base, "colour": c} for c in COLOURS]
    if attribute == "pattern":
        out = [{**base, "pattern": "solid"}]
        out += [
            {**base, "pattern": p, "secondary_colour": c} for p in PATTERNS if p != "solid" for c in COLOURS
        ]
        return out
    if attribute == "neckline":
        return [] if category in BOTTOMS else [{**base, "neckline": n} for n in NECKLINES]
    if attribute == "length":
        return [{**base, "length": v} for v in LENGTHS]
    if attribute == "details":
        subsets = [list(s) for r in range(len(DETAILS) + 1) for s in combinations(DETAILS, r)]
        return [{**base, "details": s} for s in subsets]
    if attribute == "material":
        return [{**base, "material": m} for m in MATERIALS]
    raise ConfigError(f"unknown attribute {attribute!r}; valid: {', '.join(ATTRIBUTE_ORDER)}")


class DescriberOptions(TypedDict, total=False):
    """The keywords of :class:`ClipAttributeDescriber` besides its CLIP (what
    :meth:`ClipAttributeDescriber.from_folder` passes on; the defaults are the constructor's)."""

    templates: Sequence[str]
    attributes: Sequence[str]
    batch_size: int


class ClipAttributeDescriber:
    """Zero-shot attribute prediction and description with a CLIP bundle (see the module docstring).

    Args:
        clip: the CLIP (an exported ``kind: clip`` folder loaded with :func:`load_clip_folder`, or any bundle).
        templates: prompt patterns with one ``{}`` around each ``describe`` phrase; several are averaged.
        attributes: which of :data:`ATTRIBUTE_ORDER` to choose after the category (the others stay unsaid).
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        clip: ClipBundle,
        *,
        templates: Sequence[str] = ("{}",),
        attributes: Sequence[str] = ATTRIBUTE_ORDER,
        batch_size: int = 64,
    ) -> None:
        unknown = [a for a in attributes if a not in ATTRIBUTE_ORDER]
        if unknown:
            raise ConfigError(f"unknown attributes {unknown}; valid: {', '.join(ATTRIBUTE_ORDER)}")
        self.clip = clip.eval()
        self.templates = tuple(templates)
        self.attributes = tuple(attributes)
        self.batch_size = int(batch_size)
        self._prompts: dict[str, torch.Tensor] = {}

    @classmethod
    def from_folder(
        cls, folder: str | Path, *, device: str = "cpu", **options: Unpack[DescriberOptions]
    ) -> ClipAttributeDescriber:
        """A describer on the exported CLIP in ``folder``; ``options`` are the constructor's keywords."""
        return cls(load_clip_folder(folder, device=device), **options)

    def _embed(self, candidates: Sequence[Candidate]) -> torch.Tensor:
        """``[len(candidates), d]`` prompt embeddings, each prompt's text encoded once per describer."""
        texts = [describe(c) for c in candidates]
        todo = list(dict.fromkeys(t for t in texts if t not in self._prompts))
        if todo:
            fresh = class_embeddings(self.clip, todo, templates=self.templates).cpu()
            self._prompts.update(zip(todo, fresh))
        return torch.stack([self._prompts[t] for t in texts])

    @torch.no_grad()
    def predict(
        self, images: Sequence[Image.Image], boxes: Sequence[Box | None] | None = None
    ) -> list[Candidate]:
        """One predicted attribute dict per image (cropped to its box), keys of ``describe``'s vocabulary."""
        embedded = encode_pil_images(self.clip, images, boxes=boxes, batch_size=self.batch_size)
        if embedded.shape[0] == 0:
            return []
        categories = [{"category": c} for c in CATEGORIES]
        chosen = zero_shot_scores(embedded, self._embed(categories)).argmax(dim=1).tolist()
        out: list[Candidate] = [dict(categories[i]) for i in chosen]
        for category in sorted({p["category"] for p in out}):
            rows = [i for i, p in enumerate(out) if p["category"] == category]
            for attribute in self.attributes:
                options = attribute_candidates(attribute, category)
                if not options:
                    continue
                picks = zero_shot_scores(embedded[rows], self._embed(options)).argmax(dim=1).tolist()
                for row, pick in zip(rows, picks):
                    out[row].update(options[pick])
        return out

    def caption(self, images: Sequence[Image.Image], boxes: Sequence[Box | None] | None = None) -> list[str]:
        """The ``describe`` sentence of each image's predicted attributes."""
        return [describe(p) for p in self.predict(images, boxes)]


@register_backend("clip")
class ClipCaptionBackend(CaptionBackend):
    """Caption backend ``clip``: the :class:`ClipAttributeDescriber` behind the dialogue interface.

    Args:
        model: an exported CLIP folder (``capret-train`` task ``clip``; ``kind: clip``).
        device: where the CLIP runs.
        templates: prompt patterns (see :class:`ClipAttributeDescriber`).
        batch_size: images per forward pass.
    """

    name = "clip"

    def __init__(
        self, *, model: str, device: str = "cpu", templates: Sequence[str] = ("{}",), batch_size: int = 64
    ) -> None:
        self.model_dir = str(model)
        self.describer = ClipAttributeDescriber.from_folder(
            model, device=device, templates=templates, batch_size=batch_size
        )

    def describe(self) -> dict[str, Any]:
        clip = self.describer.clip
        return {
            "name": "clip-zero-shot-v1",
            "model": self.model_dir,
            "weights": f"{clip.image_fingerprint()}:{clip.text_fingerprint()}",
            "templates": list(self.describer.templates),
            "attributes": ["category", *self.describer.attributes],
        }

    def answer(self, queries: Sequence[VisualQuery], *, max_tokens: int) -> list[Generation]:
        """Every question is answered with the description of the item's pixels inside its box."""
        captions = self.describer.caption(
            [q.image for q in queries], [q.context.bbox_in_view for q in queries]
        )
        return [Generation(text=text) for text in captions]

    def ask(self, requests: Sequence[ChatRequest], *, max_tokens: int) -> list[Generation]:
        """No follow-up question (the description already names every attribute); the summary is the
        description; an edit request gets the template backend's model-free rewrite."""
        out = []
        for request in requests:
            if request.kind == "question":
                out.append(Generation(text=""))
            elif request.kind == "edit":
                out.append(Generation(text=TemplateBackend._edit(request.dialogue)))
            else:
                out.append(Generation(text=request.dialogue[0].a if request.dialogue else ""))
        return out
