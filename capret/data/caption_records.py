"""Reading the caption store's JSONL records (DESIGN.md "Captions"): the format is a contract of the data
layer, so readers (caption joins, evaluation, training) need nothing from the captioning package, which writes
these files (:mod:`captioning.store`) and builds on this module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from capret.errors import CapretError, MissingFileError

__all__ = [
    "BINDING_FIELDS",
    "FIELD_TYPES",
    "REQUIRED_FIELDS",
    "StoreError",
    "caption_sources",
    "items_fingerprint",
    "iter_records",
    "read_captions",
    "read_records",
    "repair_command",
]

REQUIRED_FIELDS = ("key", "caption", "dialogue", "backend", "model", "prompt_version", "created")
#: What a record describes: the dataset, the split and a fingerprint of the split's items (keys and boxes).
#: DeepFashion2 image ids restart at 1 in every split, so keys alone cannot tell a train caption from a
#: validation one; the writer stamps these on every record and joins compare them. Optional when reading, so
#: stores written before they existed still load.
BINDING_FIELDS = ("dataset", "split", "fingerprint")
#: Type of each known field (validated with the line number); unknown fields are left alone.
FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "key": str,
    "caption": str,
    "dialogue": list,
    "backend": str,
    "model": (dict, str),
    "prompt_version": str,
    "created": str,
    "overwrite": bool,
    "dataset": str,
    "split": str,
    "fingerprint": str,
}


class StoreError(CapretError):
    """A caption store file is corrupt (not a crash-truncated tail), locked, or holds conflicting keys."""


def repair_command(path: str | Path) -> str:
    """The command that rewrites a store with duplicate keys (first line per key wins)."""
    return f"capret-caption --repair --out {path}"


def items_fingerprint(entries: Iterable[tuple[str, Sequence[float] | None]]) -> str:
    """A short hash of a split's items, ``(key, box or None)`` each, independent of their order.

    The caption writer computes it over every target of the split (before sharding), a join over every item of
    the split it joins to; equal fingerprints mean the store was written for these very annotations.
    """
    lines = sorted(
        key if box is None else f"{key}\t" + ",".join(f"{float(v):.2f}" for v in box) for key, box in entries
    )
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]


def _check_record(path: Path, number: int, record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise StoreError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise StoreError(f"{path}:{number}: record lacks field(s) {missing}")
    for name, kind in FIELD_TYPES.items():
        if name in record and not isinstance(record[name], kind):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise StoreError(
                f"{path}:{number}: field {name!r} must be {names}, got {type(record[name]).__name__} "
                f"{json.dumps(record[name])[:60]}"
            )
    return record


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
        self.missing_newline = False  # the last line is a complete record that only lacks its newline

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(1-based line number, record) for every complete, valid line."""
        for number, raw in enumerate(self.handle, start=1):
            if not raw.endswith(b"\n"):  # only the last line can lack its newline
                record = self._complete(number, raw)
                if record is None:  # a torn write from a killed run
                    self.truncated_tail = raw
                    return
                self.good_bytes += len(raw)
                self.missing_newline = True  # a valid record (e.g. written by hand): keep it
                yield number, record
                return
            self.good_bytes += len(raw)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                problem = exc.msg if isinstance(exc, json.JSONDecodeError) else f"not UTF-8: {exc.reason}"
                raise StoreError(
                    f"{self.path}:{number}: not valid JSON ({problem}); the store is corrupt"
                ) from None
            yield number, _check_record(self.path, number, record)

    def _complete(self, number: int, raw: bytes) -> dict[str, Any] | None:
        """The record of a last line without newline when it is whole and valid, else None (torn)."""
        if not raw.strip():
            return None
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(record, dict) or any(f not in record for f in REQUIRED_FIELDS):
            return None
        return _check_record(self.path, number, record)


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
                f"overwrite flag; keys must be unique. Keep the first line of each key with: {repair_command(path)}"
            )
        by_key[key] = record if field is None else record[field]
        line_of[key] = number
    return by_key


def _read(path: str | Path, field: str | None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"caption store {path} does not exist")
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
