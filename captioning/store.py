"""The resumable JSONL caption store (DESIGN.md "Captions").

One JSON object per line::

    {"key": "<dataset>/<image_id>/<item_index>", "caption": str, "dialogue": [{"q", "a"}, ...],
     "backend": str, "model": {...}, "prompt_version": str, "created": iso8601}

Crash safety: every batch is appended with one ``write`` of whole lines followed by ``flush`` and ``fsync``,
and a key counts as done only once its line is complete. When a run is killed (even ``kill -9`` in the middle
of a write) the file ends in at most one partial line; opening the store detects it, reports it, and truncates
the file back to the last complete line before anything is appended, so the next run re-captions exactly the
keys whose lines were lost and every key ends up in the file exactly once.

Keys are unique: a second line for a key is only written under ``overwrite=True`` and then carries
``"overwrite": true``, which is what allows it to replace the earlier line when reading. A duplicate without
that flag is an error, never a silent replacement. Failed items go to a separate failures log
(``<stem>.failures.jsonl``) with their reason and are retried by the next run, since they are not done.

One writer per file: the store holds the one-writer lock of :mod:`capret.locks` (an ``flock`` beside the file,
released by the kernel even on ``kill -9``), taken before the file is created, so two processes can never
interleave lines, the second is refused naming the first's PID, and a refused run leaves no empty store behind;
shards of one job write separate files.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from capret.data.caption_records import (
    BINDING_FIELDS,
    REQUIRED_FIELDS,
    StoreError,
    _fold,
    _Scanner,
    iter_records,
    read_captions,
    read_records,
)
from capret.errors import CaptionStoreMismatchError, ConfigError, DataError, MissingFileError
from capret.io import atomic_write_text, disk_full_named
from capret.locks import exclusive_output

__all__ = [
    "CaptionStore",
    "StoreError",
    "beside_store",
    "failures_path",
    "iter_records",
    "read_captions",
    "read_records",
    "repair_store",
    "utc_now",
]


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def beside_store(path: str | Path, suffix: str) -> Path:
    """A file or folder kept next to a caption store: ``captions.jsonl`` + ``.x`` -> ``captions.x``."""
    path = Path(path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(stem + suffix)


def failures_path(path: str | Path) -> Path:
    """``captions.jsonl`` -> ``captions.failures.jsonl`` (beside the store)."""
    return beside_store(path, ".failures.jsonl")


class CaptionStore:
    """Appends caption records to a JSONL file so that any interrupted run can resume.

    Use as a context manager; opening takes the file lock, repairs a torn last line and loads the done keys.
    """

    def __init__(
        self, path: str | Path, *, overwrite: bool = False, binding: dict[str, str] | None = None
    ) -> None:
        """``binding``: the ``dataset``/``split``/``fingerprint`` this store describes; stamped on every record
        appended, and an existing record bound to something else makes :meth:`open` fail."""
        self.path = Path(path)
        self.binding = dict(binding or {})
        unknown = set(self.binding) - set(BINDING_FIELDS)
        if unknown:
            raise ConfigError(
                f"unknown caption store binding field(s) {sorted(unknown)}; valid: {BINDING_FIELDS}"
            )
        self.failures_path = failures_path(self.path)
        self.overwrite = overwrite
        self.truncated_tail: bytes = b""  # what was cut from a torn last line on open (for the report)
        self._done: set[str] = set()
        self._fd: int | None = None
        self._created = False  # whether open() created the file (an empty one is removed again on close)
        self._lock = contextlib.ExitStack()

    # --- lifecycle ------------------------------------------------------------------------------------

    def open(self) -> CaptionStore:
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = contextlib.ExitStack()
        lock.enter_context(exclusive_output(self.path, what="caption store"))  # refuses a live writer
        created = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except BaseException:
            lock.close()
            raise
        try:
            with open(os.dup(fd), "rb") as handle:
                scanner = _Scanner(self.path, handle)
                self._done = set(_fold(self.path, self._checked(scanner), "created"))  # only keys are kept
            if scanner.missing_newline:  # a valid last record without its newline: keep it, end the line
                os.pwrite(fd, b"\n", scanner.good_bytes)
                os.fsync(fd)
            if scanner.truncated_tail:
                # A torn write from a killed run: cut it so the next append starts on a fresh line.
                self.truncated_tail = scanner.truncated_tail
                os.ftruncate(fd, scanner.good_bytes)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            if created:  # a refused first run leaves no empty store behind
                self.path.unlink(missing_ok=True)
            lock.close()
            raise
        self._fd = fd
        self._lock = lock
        self._created = created
        return self

    def _checked(self, records: Iterable[tuple[int, dict[str, Any]]]) -> Iterator[tuple[int, dict[str, Any]]]:
        """Pass records through, refusing one bound to another dataset, split or annotation version."""
        for number, record in records:
            for name, expected in self.binding.items():
                found = record.get(name)
                if found is not None and found != expected:
                    raise CaptionStoreMismatchError(
                        f"{self.path}:{number}: the store holds captions for {name} {found!r}, this run writes "
                        f"{name} {expected!r}; give this run its own --out",
                        path=self.path,
                    )
            yield number, record

    def close(self) -> None:
        if self._fd is not None:
            empty = os.fstat(self._fd).st_size == 0
            os.close(self._fd)
            self._fd = None
            if self._created and empty:  # a run that wrote nothing leaves no 0-byte store behind
                self.path.unlink(missing_ok=True)
            self._lock.close()  # releases the one-writer lock (after the unlink: no writer sees it half-gone)

    def __enter__(self) -> CaptionStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- queries ----------------------------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        return key in self._done

    def __len__(self) -> int:
        return len(self._done)

    @property
    def done_keys(self) -> frozenset[str]:
        """Keys with a complete line in the file (only keys are kept in memory, not the records)."""
        return frozenset(self._done)

    # --- writes -----------------------------------------------------------------------------------------

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Append a batch of records durably (one write of whole lines, flush, fsync).

        Refuses a key that is already stored unless the store was opened with ``overwrite=True``, in which
        case the new line carries ``"overwrite": true``.
        """
        if self._fd is None:
            raise RuntimeError(f"caption store {self.path} is not open; use it as a context manager")
        lines = []
        seen: set[str] = set()
        for record in records:
            missing = [f for f in REQUIRED_FIELDS if f not in record]
            if missing:
                raise DataError(f"caption record for {record.get('key')!r} lacks field(s) {missing}")
            key = record["key"]
            if key in seen:
                raise DataError(f"caption batch holds key {key!r} twice")
            seen.add(key)
            if key in self._done:
                if not self.overwrite:
                    raise StoreError(f"{self.path}: key {key!r} is already captioned (use overwrite)")
                record = {**record, "overwrite": True}
            if self.binding:
                record = {**record, **self.binding}
            lines.append(json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) + "\n")
        if not lines:
            return
        payload = "".join(lines).encode("utf-8")
        start = end = os.lseek(self._fd, 0, os.SEEK_END)
        view = memoryview(payload)
        try:
            with disk_full_named(self.path):
                while view:
                    written = os.pwrite(self._fd, view, end)
                    end += written
                    view = view[written:]
                os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):  # no torn line: the store ends where this batch began
                os.ftruncate(self._fd, start)
            raise
        self._done.update(seen)

    def append_failures(self, failures: Sequence[dict[str, Any]]) -> None:
        """Log failed items (``key``, ``reason``, ...) to the failures file; they stay not-done and are retried."""
        if not failures:
            return
        payload = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures)
        with disk_full_named(self.failures_path), open(self.failures_path, "a+b") as fh:
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":  # a torn line from a killed run: start a fresh line
                    payload = "\n" + payload
            fh.write(payload.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())


def repair_store(path: str | Path) -> dict[str, int]:
    """Rewrite a store so every key is unique: for each key the first line wins, later lines without an
    overwrite flag are dropped (lines marked ``"overwrite": true`` still replace, as when reading). Written
    atomically; returns ``{"kept": n, "dropped": m}``. The fix that the duplicate-key error names."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"caption store {path} does not exist")
    kept: dict[str, dict[str, Any]] = {}
    dropped = 0
    with exclusive_output(path, what="caption store"):  # no writer appends while the file is rewritten
        with open(path, "rb") as handle:
            for _, record in _Scanner(path, handle):
                key = record["key"]
                if key in kept and not record.get("overwrite", False):
                    dropped += 1
                    continue
                if key in kept:
                    dropped += 1
                kept[key] = record
        text = "".join(
            json.dumps(r, ensure_ascii=False, separators=(", ", ": ")) + "\n" for r in kept.values()
        )
        atomic_write_text(path, text, fsync=True)
    return {"kept": len(kept), "dropped": dropped}
