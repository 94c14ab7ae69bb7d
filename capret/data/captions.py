"""Join a caption store (JSONL, DESIGN.md) to dataset items by key, counting what is missing.

Captions are keyed by ``Item.key`` (``deepfashion2/<image_id>/<item_index>``). A caption run may not have
covered every item (limits, shards, failures), so the join reports how many items have no caption instead of
failing: the dual-stream model serves those through its learned no-caption path.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from capret.data.caption_records import read_captions
from capret.data.deepfashion2 import Item

__all__ = ["CaptionJoin", "join_captions", "load_caption_map"]


@dataclass(frozen=True)
class CaptionJoin:
    """Captions aligned with the items (``None`` where the store has none) and the counts of the join."""

    captions: list[str | None]
    found: int
    missing: int
    missing_keys: tuple[str, ...]  # the first few missing keys, for the report

    def summary(self) -> dict[str, int]:
        return {"captions_found": self.found, "captions_missing": self.missing}


def load_caption_map(source: str | Path | Mapping[str, str]) -> dict[str, str]:
    """A key -> caption dict from a caption-store JSONL path (read with :mod:`capret.data.caption_records`) or a mapping."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"caption store {path} does not exist")

    return read_captions(path)


def join_captions(
    items: Sequence[Item],
    source: str | Path | Mapping[str, str] | None,
    *,
    warn: bool = True,
) -> CaptionJoin:
    """Look up every item's caption by ``item.key``; ``source=None`` means no captions at all.

    Args:
        items: the items to caption.
        source: caption store path or key -> caption mapping.
        warn: emit a warning naming the count (and a few keys) when some items have no caption.
    """
    if source is None:
        return CaptionJoin(captions=[None] * len(items), found=0, missing=len(items), missing_keys=())
    table = load_caption_map(source)
    captions: list[str | None] = []
    missing: list[str] = []
    for item in items:
        caption = table.get(item.key)
        if caption is None or not caption.strip():
            missing.append(item.key)
            captions.append(None)
        else:
            captions.append(caption)
    if missing and warn:
        where = f" in {source}" if not isinstance(source, Mapping) else ""
        warnings.warn(
            f"{len(missing)} of {len(items)} items have no caption{where} (e.g. {', '.join(missing[:3])}); "
            "they use the no-caption path",
            stacklevel=2,
        )
    return CaptionJoin(
        captions=captions,
        found=len(items) - len(missing),
        missing=len(missing),
        missing_keys=tuple(missing[:10]),
    )
