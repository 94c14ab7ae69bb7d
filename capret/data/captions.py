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
from typing import Any

from capret.data.caption_records import items_fingerprint, read_captions, read_records
from capret.data.deepfashion2 import Item
from capret.errors import CaptionStoreMismatchError, ConfigError, MissingFileError

__all__ = [
    "DEFAULT_MIN_COVERAGE",
    "CaptionJoin",
    "check_binding",
    "join_captions",
    "load_caption_map",
    "split_fingerprint",
]

#: Default smallest fraction of items a caption store must cover when training or evaluating with it.
DEFAULT_MIN_COVERAGE = 0.5


def split_fingerprint(items: Sequence[Item]) -> str:
    """The fingerprint the caption writer stamps for a DeepFashion2-layout split: pass every item of it."""
    return items_fingerprint((item.key, item.bbox) for item in items)


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
        raise MissingFileError(f"caption store {path} does not exist")

    return read_captions(path)


def check_binding(
    path: Path,
    records: Mapping[str, Mapping[str, Any]],
    *,
    dataset: str | None,
    split: str | None,
    fingerprint: str | None,
) -> None:
    """Refuse a store written for another dataset, split or annotation version than the items it joins."""
    expected = {"dataset": dataset, "split": split, "fingerprint": fingerprint}
    for key, record in records.items():
        for name, want in expected.items():
            found = record.get(name)
            if want is not None and found is not None and found != want:
                what = "annotations (fingerprint)" if name == "fingerprint" else name
                raise CaptionStoreMismatchError(
                    f"caption store describes {what} {found!r} (key {key!r}) but is joined to {what} {want!r}; "
                    "caption that split into its own store (capret-caption --split ...) and pass that one",
                    path=path,
                )


def join_captions(
    items: Sequence[Item],
    source: str | Path | Mapping[str, str] | None,
    *,
    warn: bool = True,
    dataset: str | None = None,
    split: str | None = None,
    fingerprint: str | None = None,
    min_coverage: float = 0.0,
) -> CaptionJoin:
    """Look up every item's caption by ``item.key``; ``source=None`` means no captions at all.

    Args:
        items: the items to caption.
        source: caption store path or key -> caption mapping.
        warn: emit a warning naming the count (and a few keys) when some items have no caption.
        dataset, split, fingerprint: what the items are (``fingerprint``: :func:`items_fingerprint` of every
            item of the split); a store whose records say otherwise is refused (records without these fields,
            from older stores, are accepted).
        min_coverage: the smallest fraction of ``items`` that must find a caption; below it the join is an
            error, since a store for other items (or a different key scheme) would otherwise silently run the
            whole evaluation on the no-caption path.
    """
    if not 0.0 <= min_coverage <= 1.0:
        raise ConfigError(f"min_coverage must be in [0, 1], got {min_coverage}")
    if source is None:
        return CaptionJoin(captions=[None] * len(items), found=0, missing=len(items), missing_keys=())
    if isinstance(source, Mapping):
        table = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise MissingFileError(f"caption store {path} does not exist", path=path)
        records = read_records(path)
        check_binding(path, records, dataset=dataset, split=split, fingerprint=fingerprint)
        table = {key: record["caption"] for key, record in records.items()}
    captions: list[str | None] = []
    missing: list[str] = []
    for item in items:
        caption = table.get(item.key)
        if caption is None or not caption.strip():
            missing.append(item.key)
            captions.append(None)
        else:
            captions.append(caption)
    found = len(items) - len(missing)
    where = f" in {source}" if not isinstance(source, Mapping) else ""
    if items and found / len(items) < min_coverage:
        raise CaptionStoreMismatchError(
            f"only {found} of {len(items)} items have a caption{where} ({found / len(items):.1%} < the required "
            f"{min_coverage:.0%}; e.g. missing {', '.join(missing[:3])}); is it the store of this dataset and "
            "split? Lower the minimum caption coverage to accept a partial store",
            path=None if isinstance(source, Mapping) else Path(source),
        )
    if missing and warn:
        warnings.warn(
            f"{len(missing)} of {len(items)} items have no caption{where} (e.g. {', '.join(missing[:3])}); "
            "they use the no-caption path",
            stacklevel=2,
        )
    return CaptionJoin(
        captions=captions,
        found=found,
        missing=len(missing),
        missing_keys=tuple(missing[:10]),
    )
