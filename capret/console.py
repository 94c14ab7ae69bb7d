"""What every console script shares: JSON printing and the error boundary (user errors become one line and a
non-zero exit). It sits at the bottom of the package so that ``capret.cli`` and ``captioning.cli`` both use it."""

from __future__ import annotations

import json
import sys
from typing import Any

from capret.config import ConfigError


class NotAvailableError(RuntimeError):
    """A command or mode whose implementation has not landed."""


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
    print(f"error: {message}", file=sys.stderr)
    return code


def run_guarded(fn: Any, *args: Any) -> int:
    """Run a command body, turning user errors into one-line messages with exit code 2."""
    try:
        result = fn(*args)
    except NotAvailableError as exc:
        return fail(str(exc))
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        return fail(f"{msg}")
    return int(result or 0)
