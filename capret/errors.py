"""Typed errors raised by the library; the console scripts turn each into one line and a non-zero exit.

Every error that concerns a file carries its path, so the message a user reads always names what to fix.
``CapretError`` subclasses ``ValueError`` because most of them are bad values; code that already catches
``ValueError`` keeps working.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "BadImageError",
    "CapretError",
    "CaptionStoreMismatchError",
    "CheckpointError",
    "DataError",
    "MissingDependencyError",
    "MissingFileError",
    "MissingImageError",
    "NonFiniteError",
    "OutputFolderError",
]


class CapretError(ValueError):
    """Base class: an expected failure with a message fit for a user (no traceback needed)."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        text = (
            f"{self.path}: {message}" if self.path is not None and str(self.path) not in message else message
        )
        super().__init__(text)


class DataError(CapretError):
    """An annotation, split or dataset file is missing, unreadable or holds an invalid value."""


class BadImageError(DataError):
    """An image file cannot be decoded (missing, truncated, corrupt or not an image)."""


class MissingFileError(DataError, FileNotFoundError):
    """A file the run needs does not exist (also a ``FileNotFoundError`` for callers that expect one)."""


class MissingImageError(BadImageError, FileNotFoundError):
    """An image file listed by a dataset does not exist (also a ``FileNotFoundError`` for callers that expect
    one)."""


class CaptionStoreMismatchError(DataError):
    """A caption store describes another dataset, split or annotation version than the items it is joined to."""


class CheckpointError(CapretError):
    """A checkpoint or model folder is missing files, fails its checksum, or does not fit the model."""


class NonFiniteError(CapretError):
    """An array that must be finite holds NaN or Inf (the message names the array and the first bad index)."""


class OutputFolderError(CapretError):
    """An output folder holds the results of a different run and ``--overwrite`` was not given."""


class MissingDependencyError(CapretError):
    """An optional package needed by the requested feature is not installed."""
