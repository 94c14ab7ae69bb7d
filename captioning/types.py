"""Value types passed between the captioning loop, its backends and the store.

The loop talks to every backend through two batched calls (``ask`` for the question-asking/summarising LLM,
``answer`` for the VLM that sees the item). Requests carry both the rendered chat ``messages`` (what a real
model reads) and the structured ``context``/``dialogue`` they were rendered from, so that the model-free
``template`` backend can answer from the pixels (and, under the explicit oracle only, the annotation) while
keeping the exact same record shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

__all__ = ["QA", "ChatRequest", "Generation", "ItemContext", "VisualQuery"]


@dataclass(frozen=True)
class QA:
    """One question of the dialogue and the VLM's (trimmed) answer."""

    q: str
    a: str

    def to_dict(self) -> dict[str, str]:
        return {"q": self.q, "a": self.a}


@dataclass(frozen=True)
class ItemContext:
    """What the dialogue is told about an item besides its pixels.

    By default ``category`` is a model's prediction (or "") and ``attributes`` is empty; only the explicit
    oracle (``--oracle-attributes``) fills them from the annotation. ``bbox_in_view`` is the item's box in the
    coordinates of the image the VLM is shown (after cropping with context margin), so that pixel-based
    answers can separate the garment from its surroundings; ``image_size`` and ``bbox_in_image`` place the box
    in the full photo (how large the item appears).
    """

    key: str
    category: str = ""  # category name, e.g. "short sleeve top" ("" when unknown)
    category_id: int | None = None  # dataset category id (oracle only)
    attributes: dict[str, Any] = field(
        default_factory=dict
    )  # oracle only: viewpoint, occlusion, zoom_in, scale
    bbox_in_view: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 in view pixels
    image_size: tuple[int, int] | None = None  # width, height of the full photo
    bbox_in_image: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 in the full photo


@dataclass(frozen=True)
class ChatRequest:
    """One prompt for the text-only LLM.

    ``kind`` says which step asked: a new question or the final summary of the dialogue, or ``edit`` (the
    caption-then-rewrite CIR pipeline, :mod:`capret.inference.cir.cirevl`: ``dialogue`` is then the image
    description and the requested modification, ``(QA(description question, description), QA(instruction,
    modification))``). Real backends only read ``messages``.
    """

    messages: list[dict[str, Any]]
    kind: Literal["question", "summary", "edit"]
    context: ItemContext
    dialogue: tuple[QA, ...] = ()


@dataclass(frozen=True)
class VisualQuery:
    """One question to the VLM about one item, with the previous turns it may read (ChatCaptioner)."""

    image: Image.Image
    question: str
    messages: list[dict[str, Any]]  # chat messages; the image appears as a {"type": "image"} content part
    context: ItemContext
    history: tuple[QA, ...] = ()


@dataclass(frozen=True)
class Generation:
    """A backend's reply to one request: the text, token usage, and an error when the request failed.

    A failed request never raises out of a batched call: one bad item must not lose the rest of the batch.
    """

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
