"""The caption stage of the query pipeline: "the input is a query image; its caption is built behind the scene".

:class:`Captioner` runs the captioning dialogue (:func:`captioning.loop.caption_batch`) with any registered
backend — ``template`` (no model), ``transformers`` (local VLM/LLM), ``openai`` (an OpenAI-compatible server) —
on the detected items of a photo, and caches each caption under a key made of the *pixels* and the box
(``query/<sha1 of the decoded image>/<x1>_<y1>_<x2>_<y2>``), so the same photo and box are never captioned twice,
whatever file name or upload they come from. The cache is a caption store (JSONL, the same record shape as
``capret-caption`` writes) when ``cache`` is a path, else it lives in memory only.

What the backend is told about an item comes from pixels and the detector's prediction (its category), never
from an annotation: there is none at query time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from capret.config import from_dict
from capret.data.deepfashion2 import CATEGORIES
from capret.errors import ConfigError
from captioning.backends import create_backend
from captioning.backends.base import CaptionBackend
from captioning.loop import CaptionTask, LoopConfig, caption_batch
from captioning.prompts import PromptSet, get_prompt_set
from captioning.store import CaptionStore, read_captions, utc_now

__all__ = ["Captioner", "CaptionerSettings", "caption_key", "image_digest"]

Box = tuple[float, float, float, float]


@dataclass
class CaptionerSettings:
    """What ``pipeline.json`` stores about the captioner (backend options are the backend's own keywords)."""

    backend: str = "template"  # registered caption backend: template | transformers | openai
    options: dict[str, Any] = field(default_factory=dict)  # keyword options of the backend
    prompt_set: str = "capret-chat-v1"  # prompt set of the dialogue
    loop: dict[str, Any] = field(default_factory=dict)  # LoopConfig overrides (rounds, view, ...)
    cache: str | None = (
        "query_captions.jsonl"  # caption store (relative to the pipeline folder); None = memory
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "options": dict(self.options),
            "prompt_set": self.prompt_set,
            "loop": dict(self.loop),
            "cache": self.cache,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptionerSettings:
        valid = {"backend", "options", "prompt_set", "loop", "cache"}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ConfigError(f"unknown captioner setting(s) {unknown}; valid: {sorted(valid)}")
        return cls(**data)


def image_digest(image: Image.Image) -> str:
    """SHA-1 of the decoded RGB pixels and size (the same photo re-encoded or renamed gives the same key)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha1(f"{rgb.width}x{rgb.height}".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()[:20]


def caption_key(digest: str, box: Box | None) -> str:
    """Cache key of one item: the image digest and the box rounded to whole pixels (``full`` = whole image)."""
    where = "full" if box is None else "_".join(str(round(float(v))) for v in box)
    return f"query/{digest}/{where}"


def _category_name(category_id: int | None) -> str:
    """The detector's predicted DeepFashion2 category as a name ("" when unknown)."""
    return CATEGORIES.get(category_id, "") if category_id is not None else ""


class Captioner:
    """Caption items of photos with one backend, cached; see the module docstring."""

    def __init__(
        self,
        backend: CaptionBackend,
        *,
        prompts: PromptSet | None = None,
        loop: LoopConfig | None = None,
        cache: str | Path | None = None,
        batch_size: int = 8,
    ) -> None:
        self.backend = backend
        self.prompts = prompts or get_prompt_set("capret-chat-v1")
        self.loop = loop or LoopConfig()
        self.batch_size = int(batch_size)
        self.cache_path = Path(cache) if cache is not None else None
        self._memory: dict[str, str] = {}
        self._store: CaptionStore | None = None
        self.last_cache_hits = 0
        self.last_errors: list[str] = []

    @classmethod
    def from_settings(cls, settings: CaptionerSettings, *, base_dir: Path | None = None) -> Captioner:
        cache = None
        if settings.cache:
            cache = Path(settings.cache)
            if not cache.is_absolute() and base_dir is not None:
                cache = base_dir / cache
        return cls(
            create_backend(settings.backend, **settings.options),
            prompts=get_prompt_set(settings.prompt_set),
            loop=from_dict(LoopConfig, dict(settings.loop)),
            cache=cache,
        )

    @property
    def name(self) -> str:
        return self.backend.name

    def _open_store(self) -> None:
        if self.cache_path is None or self._store is not None:
            return
        if self.cache_path.is_file():
            self._memory.update(read_captions(self.cache_path))
        self._store = CaptionStore(self.cache_path).open()

    def caption(
        self,
        images: Sequence[Image.Image],
        boxes: Sequence[Box | None],
        *,
        category_ids: Sequence[int | None] | None = None,
        digests: Sequence[str] | None = None,
    ) -> list[str | None]:
        """One caption per ``(image, box)`` (``None`` when the dialogue failed: that item goes image-only).

        ``digests`` (optional) are the :func:`image_digest` of each image, when the caller already has them.
        """
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images for {len(boxes)} boxes")
        self._open_store()
        category_ids = list(category_ids) if category_ids is not None else [None] * len(images)
        digest_of: dict[int, str] = {}
        keys = []
        for i, image in enumerate(images):
            if digests is not None:
                digest = digests[i]
            else:
                digest = digest_of.setdefault(id(image), image_digest(image))
            keys.append(caption_key(digest, boxes[i]))
        todo = [i for i, key in enumerate(keys) if key not in self._memory]
        self.last_cache_hits = len(images) - len(todo)
        self.last_errors = []
        unique: dict[str, int] = {}
        for i in todo:
            unique.setdefault(keys[i], i)
        pending = list(unique.values())
        for start in range(0, len(pending), self.batch_size):
            batch = pending[start : start + self.batch_size]
            tasks = [
                CaptionTask(
                    key=keys[i],
                    image=images[i],
                    bbox=boxes[i],
                    category=_category_name(category_ids[i]),
                    category_id=category_ids[i],
                )
                for i in batch
            ]
            results = caption_batch(tasks, backend=self.backend, prompts=self.prompts, config=self.loop)
            records = []
            for result in results:
                if not result.ok:
                    self.last_errors.append(f"{result.key}: {result.error}")
                    continue
                self._memory[result.key] = result.caption
                records.append(
                    {
                        "key": result.key,
                        "caption": result.caption,
                        "dialogue": [qa.to_dict() for qa in result.dialogue],
                        "backend": self.backend.name,
                        "model": self.backend.describe(),
                        "prompt_version": self.prompts.version,
                        "created": utc_now(),
                    }
                )
            if self._store is not None and records:
                self._store.append(records)
        return [self._memory.get(key) for key in keys]

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        self.backend.close()
