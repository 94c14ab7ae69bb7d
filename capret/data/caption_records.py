"""Reading the caption store's JSONL records (DESIGN.md "Captions"): the format is a contract of the data
layer, so readers (caption joins, evaluation, training) need nothing from the captioning package, which writes
these files (:mod:`captioning.store`) and builds on this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "REQUIRED_FIELDS",
    "StoreError",
    "caption_sources",
    "iter_records",
    "read_captions",
    "read_records",
]

REQUIRED_FIELDS = ("key", "caption", "dialogue", "backend", "model", "prompt_version", "created")


class StoreError(ValueError):
    """A caption store file is corrupt (not a crash-truncated tail), locked, or holds conflicting keys."""


class _Scanner:
    """Streams a store file line by line (memory bounded by one record, not the file).

    After iteration, ``good_bytes`` is the length of the prefix made of complete lines and ``truncated_tail``
    the partial last line left by a torn write (``b""`` when the file ends cleanly).
    """

    def __init__(self, path: Path, handle: BinaryIO) -> None:
        self.path = path
        self.handle = handle
        self.good_bytes = 0
        self.truncated_tail = b""

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(1-based line number, record) for every complete, valid line."""
        for number, raw in enumerate(self.handle, start=1):
            if not raw.endswith(b"\n"):  # only the last line can lack its newline: a torn write
                self.truncated_tail = raw
                return
            self.good_bytes += len(raw)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise StoreError(
                    f"{self.path}:{number}: not valid JSON ({exc.msg}); the store is corrupt"
                ) from None
            if not isinstance(record, dict):
                raise StoreError(f"{self.path}:{number}: expected a JSON object, got {type(record).__name__}")
            missing = [f for f in REQUIRED_FIELDS if f not in record]
            if missing:
                raise StoreError(f"{self.path}:{number}: record lacks field(s) {missing}")
            yield number, record


def _fold(path: Path, records: Iterable[tuple[int, dict[str, Any]]], field: str | None) -> dict[str, Any]:
    """Key -> record (or its ``field``); a later line replaces an earlier one only when it says
    ``"overwrite": true``."""
    by_key: dict[str, Any] = {}
    line_of: dict[str, int] = {}
    for number, record in records:
        key = record["key"]
        if key in line_of and not record.get("overwrite", False):
            raise StoreError(
                f"{path}: key {key!r} appears on lines {line_of[key]} and {number} without an "
                "overwrite flag; keys must be unique (re-run with --overwrite to replace captions)"
            )
        by_key[key] = record if field is None else record[field]
        line_of[key] = number
    return by_key


def _read(path: str | Path, field: str | None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption store {path} does not exist")
    with open(path, "rb") as handle:
        return _fold(path, _Scanner(path, handle), field)


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every complete record in file order (a crash-truncated last line is skipped)."""
    path = Path(path)
    with open(path, "rb") as handle:
        for _, record in _Scanner(path, handle):
            yield record


def read_records(path: str | Path) -> dict[str, dict[str, Any]]:
    """Key -> the record that counts (explicit overwrites applied); a truncated last line is ignored."""
    return _read(path, None)


def read_captions(path: str | Path) -> dict[str, str]:
    """Key -> caption, for joining captions to dataset items by ``Item.key``."""
    return _read(path, "caption")


def caption_sources(path: str | Path) -> dict[str, int]:
    """How a store's captions were made: record count per ``caption_source`` (``pixels``, ``oracle-attributes``;
    ``unrecorded`` for records written before the field existed), so every report can say whether it rests on
    oracle captions."""
    counts: dict[str, int] = {}
    for record in read_records(path).values():
        source = str(record.get("caption_source", "unrecorded"))
        counts[source] = counts.get(source, 0) + 1
    return counts
