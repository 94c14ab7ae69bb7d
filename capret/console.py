"""What every console script shares: JSON printing and the error boundary (a user's mistake becomes one line and
exit code 2; a bug keeps its traceback and exits 3). It sits at the bottom of the package so that ``capret.cli``
and ``captioning.cli`` both use it.

The boundary (:func:`run_guarded`) prints one line on stderr naming the file, field or value, and returns exit
code 2, for exactly these failures:

- a :class:`capret.errors.CapretError` (config, usage, data, checkpoint, availability, non-finite loss ...): the
  library raises those on purpose, with a message written for the user;
- the OS and parse errors of the user's files: a missing, unreadable or misplaced file (``FileNotFoundError``,
  ``PermissionError``, ``IsADirectoryError``, ``NotADirectoryError``, any ``OSError`` that names its file), text
  that is not UTF-8, JSON or YAML that does not parse, a corrupt safetensors file, an image PIL cannot identify.

Anything else (a ``TypeError``, a bare ``ValueError``/``KeyError``, an ``IndexError``...) is a bug in capret:
the boundary prints its traceback and a line saying it is a bug and how to report it, and returns
:data:`BUG_EXIT_CODE` (3), so a bug never looks like the user's mistake. ``--debug`` (or ``CAPRET_DEBUG=1``)
prints the traceback of user errors too, for reports. ``docs/errors.md`` documents the family.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

from capret.errors import CapretError, NotAvailableError

__all__ = [
    "BUG_EXIT_CODE",
    "DEBUG_HELP",
    "USER_ERROR_EXIT_CODE",
    "NotAvailableError",
    "add_debug_flag",
    "add_progress_flag",
    "debug_enabled",
    "describe_error",
    "fail",
    "is_user_error",
    "print_json",
    "progress_wanted",
    "run_guarded",
]

DEBUG_HELP = "print the full traceback of an error (also: CAPRET_DEBUG=1)"
USER_ERROR_EXIT_CODE = 2  # a CapretError or an OS/parse error of a user's file (argparse also exits 2)
BUG_EXIT_CODE = 3  # anything else: a bug in capret, shown with its traceback
REPORT_HINT = (
    "this is a bug in capret, not a problem with your input; please report it with the traceback above, "
    "the command you ran and the output of `pip show capret`"
)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def fail(message: str, code: int = 2) -> int:
    """Print a one-line error to stderr and return the exit code (callers ``return fail(...)``)."""
    text = " ".join(str(message).split())  # one line, whatever the message held
    print(f"error: {text}", file=sys.stderr)
    return code


def add_debug_flag(parser: Any) -> None:
    """Add ``--debug`` to a console script's parser (read by :func:`run_guarded` from the parsed namespace)."""
    parser.add_argument("--debug", action="store_true", default=False, help=DEBUG_HELP)


def add_progress_flag(parser: Any) -> None:
    """Add ``--no-progress`` to a long command's parser (read by :func:`progress_wanted`)."""
    from capret.progress import NO_PROGRESS_HELP

    parser.add_argument("--no-progress", action="store_true", default=False, help=NO_PROGRESS_HELP)


def progress_wanted(args: Any) -> bool:
    """Whether a command draws its progress bars: not after ``--no-progress``, nor with ``CAPRET_NO_PROGRESS``
    set (see :mod:`capret.progress`)."""
    from capret.progress import progress_enabled

    return progress_enabled(not getattr(args, "no_progress", False))


def debug_enabled(*args: Any) -> bool:
    """``CAPRET_DEBUG`` set to a true value, or a parsed namespace among ``args`` with ``debug=True``."""
    if os.environ.get("CAPRET_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return any(getattr(a, "debug", False) is True for a in args)


_FILE_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


def _parse_error_types() -> tuple[type[BaseException], ...]:
    """Parse errors of a user's file raised by the libraries we read them with (only when importable)."""
    types: list[type[BaseException]] = [UnicodeDecodeError, json.JSONDecodeError]
    try:
        import yaml

        types.append(yaml.YAMLError)
    except ImportError:  # pragma: no cover - yaml is a dependency
        pass
    try:
        from safetensors import SafetensorError

        types.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    try:
        from PIL import UnidentifiedImageError

        types.append(UnidentifiedImageError)
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    return tuple(types)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the user's mistake (one line, exit 2) rather than a bug (traceback, exit 3).

    A :class:`~capret.errors.CapretError`, an OS error of a named or missing file, or a parse error of a file's
    contents. A bare ``ValueError``/``KeyError``/``TypeError`` is not: library code that rejects a user's value
    raises a typed error naming it, so what is left is a broken contract inside capret.
    """
    if isinstance(exc, (CapretError, *_FILE_ERRORS, *_parse_error_types())):
        return True
    return isinstance(exc, OSError) and exc.filename is not None


def describe_error(exc: BaseException) -> str:
    """The one line a user reads for an expected failure: what went wrong, and where, as precisely as the
    exception allows."""
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}); rerun with --debug to see which file"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg} (rerun with --debug to see where)"
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in str(exc):
        return f"{exc.filename}: {exc.strerror or exc}"
    if type(exc).__name__ == "SafetensorError":
        return f"corrupt or truncated safetensors file: {exc}"
    return str(exc) or type(exc).__name__


def run_guarded(fn: Any, *args: Any, debug: bool | None = None) -> int:
    """Run a command body: a user's mistake becomes one line and exit code 2, a bug its traceback and exit 3.

    Args:
        fn: the command body; its return value (an int or None) is the exit code.
        args: passed to ``fn``; a parsed ``argparse.Namespace`` among them may carry ``debug``.
        debug: force the traceback of user errors on or off (default: ``--debug`` in ``args`` or
            ``CAPRET_DEBUG``). Bugs always show theirs.
    """
    show = debug_enabled(*args) if debug is None else debug
    try:
        result = fn(*args)
    except Exception as exc:
        if not is_user_error(exc):
            traceback.print_exc(file=sys.stderr)
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return fail(REPORT_HINT, BUG_EXIT_CODE)
        if show:
            traceback.print_exc(file=sys.stderr)
        return fail(describe_error(exc), USER_ERROR_EXIT_CODE)
    return int(result or 0)
