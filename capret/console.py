"""What every console script shares: JSON printing and the error boundary (user errors become one line and a
non-zero exit). It sits at the bottom of the package so that ``capret.cli`` and ``captioning.cli`` both use it.

The boundary (:func:`run_guarded`) maps every *expected* failure -- a typed :mod:`capret.errors` error, a bad
config, a missing or unreadable file, text that is not UTF-8, JSON or YAML that does not parse, a corrupt
safetensors file, a missing optional package -- to one line on stderr naming the file, field or value, and
exit code 2. Anything else is a bug and keeps its traceback. ``--debug`` (or ``CAPRET_DEBUG=1``) prints the
traceback of expected failures too, for reports.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

from capret.config import ConfigError
from capret.errors import NotAvailableError

__all__ = [
    "DEBUG_HELP",
    "NotAvailableError",
    "add_debug_flag",
    "debug_enabled",
    "describe_error",
    "fail",
    "print_json",
    "run_guarded",
]

DEBUG_HELP = "print the full traceback of an error (also: CAPRET_DEBUG=1)"


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


def debug_enabled(*args: Any) -> bool:
    """``CAPRET_DEBUG`` set to a true value, or a parsed namespace among ``args`` with ``debug=True``."""
    if os.environ.get("CAPRET_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return any(getattr(a, "debug", False) is True for a in args)


def _expected_types() -> tuple[type[BaseException], ...]:
    """Exception types that are user-facing failures (optional libraries only when importable)."""
    types: list[type[BaseException]] = [
        NotAvailableError,
        ConfigError,
        ValueError,  # includes CapretError, UnicodeDecodeError and json.JSONDecodeError
        KeyError,
        OSError,  # includes FileNotFoundError, PermissionError, PIL.UnidentifiedImageError
        ImportError,  # a missing optional dependency
    ]
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
    return tuple(types)


def describe_error(exc: BaseException) -> str:
    """The one line a user reads for an expected failure: what went wrong, and where, as precisely as the
    exception allows."""
    if isinstance(exc, KeyError):
        return str(exc.args[0]) if exc.args else "missing key"
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}); rerun with --debug to see which file"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg} (rerun with --debug to see where)"
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"optional package {exc.name!r} is not installed (pip install {exc.name.split('.')[0]})"
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in str(exc):
        return f"{exc.filename}: {exc.strerror or exc}"
    if type(exc).__name__ == "SafetensorError":
        return f"corrupt or truncated safetensors file: {exc}"
    return str(exc) or type(exc).__name__


def run_guarded(fn: Any, *args: Any, debug: bool | None = None) -> int:
    """Run a command body, turning expected failures into one line on stderr and exit code 2.

    Args:
        fn: the command body; its return value (an int or None) is the exit code.
        args: passed to ``fn``; a parsed ``argparse.Namespace`` among them may carry ``debug``.
        debug: force the traceback on or off (default: ``--debug`` in ``args`` or ``CAPRET_DEBUG``).
    """
    show = debug_enabled(*args) if debug is None else debug
    try:
        result = fn(*args)
    except _expected_types() as exc:
        if show:
            traceback.print_exc(file=sys.stderr)
        return fail(describe_error(exc))
    return int(result or 0)
