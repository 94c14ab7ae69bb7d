"""The caption-backend interface and its registry (the built-in backends register themselves from
:mod:`captioning.backends`)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from capret.registry import Registry
from captioning.types import ChatRequest, Generation, VisualQuery

__all__ = ["CaptionBackend", "create_backend", "list_backends", "register_backend"]


class CaptionBackend(abc.ABC):
    """The two batched calls of the dialogue, plus provenance for the caption records."""

    #: registry name, written into each record's ``backend`` field
    name: str = ""

    @abc.abstractmethod
    def ask(self, requests: Sequence[ChatRequest], *, max_tokens: int) -> list[Generation]:
        """LLM side: one generation per chat request, in order."""

    @abc.abstractmethod
    def answer(self, queries: Sequence[VisualQuery], *, max_tokens: int) -> list[Generation]:
        """VLM side: one answer per (image, question, history), in order."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """The record's ``model`` field: model names/revisions and settings that change outputs (no secrets)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to release
        """Release connections, threads or models."""

    def __enter__(self) -> CaptionBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: backends that need a model from ``capret`` live above this package (the import layers of DESIGN.md); the
#: registry names the module that registers each, and imports it only when the backend is asked for
_BACKENDS: Registry[CaptionBackend] = Registry(
    "caption backend", lazy_modules={"clip": "capret.inference.query.clip_captioner"}
)
register_backend, create_backend, list_backends = _BACKENDS.functions()
