"""Typed errors raised by the library; the console scripts turn each into one line and a non-zero exit.

Every error that concerns a file carries its path, so the message a user reads always names what to fix.
``CapretError`` subclasses ``ValueError`` because most of them are bad values; code that already catches
``ValueError`` keeps working.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BadImageError",
    "CapretError",
    "CaptionStoreMismatchError",
    "CheckpointError",
    "DataError",
    "IncompleteCheckpointError",
    "MissingDependencyError",
    "MissingFileError",
    "MissingImageError",
    "NonFiniteError",
    "OutputFolderError",
    "require_finite",
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


class IncompleteCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint folder or one of its files does not exist (also a ``FileNotFoundError``)."""


class NonFiniteError(CapretError):
    """An array that must be finite holds NaN or Inf (the message names the array and the first bad index)."""


class OutputFolderError(CapretError):
    """An output folder holds the results of a different run and ``--overwrite`` was not given."""


class MissingDependencyError(CapretError):
    """An optional package needed by the requested feature is not installed."""


def require_finite(values: Any, *, what: str, path: str | Path | None = None) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` (and ``path``) and the first NaN/Inf index of ``values``.

    A single NaN feature or score otherwise turns into a plausible-looking metric: NaN compares false, so it
    sorts anywhere, and a NaN box counts as a hit. Accepts numpy arrays, torch tensors and nested sequences;
    integer and boolean arrays are always finite and cost nothing.
    """
    if hasattr(values, "detach"):  # a torch tensor: check on its device, copy only the first bad index
        if values.dtype.is_floating_point or values.dtype.is_complex:
            bad = ~values.isfinite()
            if bool(bad.any()):
                index = tuple(int(i) for i in bad.nonzero()[0].tolist())
                value = values[index].item() if index else values.item()
                _raise_non_finite(what, path, index, value)
        return
    array = np.asarray(values)
    if array.dtype.kind not in "fc":
        if array.dtype.kind == "O":  # ragged or mixed: check element by element
            for position, element in enumerate(array.reshape(-1).tolist()):
                require_finite(np.asarray(element, dtype=np.float64), what=f"{what}[{position}]", path=path)
        return
    bad = ~np.isfinite(array)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        _raise_non_finite(what, path, index, array[index].item() if index else array.item())


def _raise_non_finite(what: str, path: str | Path | None, index: tuple[int, ...], value: Any) -> None:
    where = f" at index {list(index)}" if index else ""
    raise NonFiniteError(f"{what} holds {value}{where}; only finite numbers are valid", path=path)
