"""Typed errors raised by the library; the console scripts turn each into one line and exit code 2.

One family: every error the library raises on purpose derives from :class:`CapretError`, so the console
boundary (:func:`capret.console.run_guarded`) can tell a user's mistake (a ``CapretError``, or an OS/parse error
of a user's file) from a bug (anything else, shown with its traceback and exit code 3). See ``docs/errors.md``.

Every error that concerns a file carries its path, so the message a user reads always names what to fix; the
others name the field or option and the offending value. ``CapretError`` subclasses ``ValueError`` because most
of them are bad values; code that already catches ``ValueError`` keeps working. Subclasses that stand in for a
built-in error callers already expect (``FileNotFoundError``, ``KeyError``, ``RuntimeError``) derive from it too.

Bare ``ValueError``/``TypeError`` stay for violations of a programming contract (a caller passing a tensor of
the wrong rank): those are bugs, and the boundary shows them as such.
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
    "ConfigError",
    "DataError",
    "IncompleteCheckpointError",
    "MissingDependencyError",
    "MissingFileError",
    "MissingImageError",
    "MissingKeyError",
    "NonFiniteError",
    "NonFiniteLossError",
    "NotAvailableError",
    "OutputFolderError",
    "DiskFullError",
    "UnknownNameError",
    "UsageError",
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

    def __str__(self) -> str:
        # The plain message, also for subclasses that mix in KeyError (whose own __str__ would quote it).
        return str(self.args[0]) if self.args else type(self).__name__


class ConfigError(CapretError):
    """A configuration file, override or config field does not match the declared fields or holds an invalid
    value (the message names the key and the value, and the valid ones). Importable from ``capret.config`` too."""


class UsageError(CapretError):
    """A command-line option, argument or combination of them is invalid (the message names the option)."""


class UnknownNameError(CapretError, KeyError):
    """A name looked up in a registry (encoder, loss, dataset, task, backend...) is not registered; the message
    lists the valid names. Also a ``KeyError`` for callers that expect one."""


class NotAvailableError(CapretError, RuntimeError):
    """A command, mode or combination whose implementation is not available in this build or environment.
    Importable from ``capret.console`` too."""


class DataError(CapretError):
    """An annotation, split or dataset file is missing, unreadable or holds an invalid value."""


class BadImageError(DataError):
    """An image file cannot be decoded (missing, truncated, corrupt or not an image)."""


class MissingFileError(DataError, FileNotFoundError):
    """A file the run needs does not exist (also a ``FileNotFoundError`` for callers that expect one)."""


class MissingImageError(BadImageError, FileNotFoundError):
    """An image file listed by a dataset does not exist (also a ``FileNotFoundError`` for callers that expect
    one)."""


class MissingKeyError(DataError, KeyError):
    """A key (image name, item or query id, token) is not in the file or store that should hold it; the
    message names both. Also a ``KeyError`` for callers that expect one."""


class CaptionStoreMismatchError(DataError):
    """A caption store describes another dataset, split or annotation version than the items it is joined to."""


class CheckpointError(CapretError):
    """A checkpoint or model folder is missing files, fails its checksum, or does not fit the model."""


class IncompleteCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint folder or one of its files does not exist (also a ``FileNotFoundError``)."""


class NonFiniteError(CapretError):
    """An array that must be finite holds NaN or Inf (the message names the array and the first bad index)."""


class NonFiniteLossError(NonFiniteError, RuntimeError):
    """Training stopped because a loss term or the gradient norm became NaN/inf; carries the step, the
    non-finite terms and the last good checkpoint (if any). Importable from ``capret.engine.trainer`` too."""

    def __init__(self, message: str, *, step: int, terms: list[str], checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.terms = terms
        self.checkpoint = checkpoint


class OutputFolderError(CapretError):
    """An output folder holds the results of a different run and ``--overwrite`` was not given."""


class DiskFullError(CapretError, OSError):
    """The disk (or quota) holding an output is full: the message says "disk full" and names the file being
    written (the OS error alone names neither). Also an ``OSError`` for callers that expect one."""


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
