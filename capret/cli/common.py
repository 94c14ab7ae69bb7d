"""What the CLI modules share: the console boundary (re-exported from :mod:`capret.console`) and the argparse
``type=`` helpers that check every numeric option's range.

Each helper parses one option value and raises ``argparse.ArgumentTypeError`` with the valid range, so argparse
prints one line naming the option (``argument --steps: must be a whole number >= 1, got '0'``) and exits 2 before
any work starts. Writing them once keeps ``--max-upload-mb -1`` or ``--steps 0`` from reaching a library that
would turn them into a silent empty result.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
from pathlib import Path

from capret.console import NotAvailableError, add_debug_flag, fail, print_json, run_guarded

__all__ = [
    "NotAvailableError",
    "add_debug_flag",
    "add_image_source_flags",
    "fail",
    "finite_float",
    "fraction",
    "host",
    "non_negative_float",
    "non_negative_int",
    "port",
    "positive_float",
    "positive_int",
    "print_json",
    "run_guarded",
]


def _int(text: str, *, minimum: int, what: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _float(text: str, *, minimum: float | None, strict: bool, maximum: float | None, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    too_low = minimum is not None and (value <= minimum if strict else value < minimum)
    too_high = maximum is not None and value > maximum
    if not math.isfinite(value) or too_low or too_high:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts, sizes, steps, k)."""
    return _int(text, minimum=1, what="a whole number >= 1")


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (seeds, worker counts, limits where 0 means none)."""
    return _int(text, minimum=0, what="a whole number >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0 (sizes in MB, time budgets, learning rates)."""
    return _float(text, minimum=0.0, strict=True, maximum=None, what="a finite number > 0")


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (weights, thresholds)."""
    return _float(text, minimum=0.0, strict=False, maximum=None, what="a finite number >= 0")


def fraction(text: str) -> float:
    """A finite number in [0, 1] (coverages, rates, decays)."""
    return _float(text, minimum=0.0, strict=False, maximum=1.0, what="a number in [0, 1]")


def finite_float(text: str) -> float:
    """Any finite number (NaN and Inf are refused)."""
    return _float(text, minimum=None, strict=False, maximum=None, what="a finite number")


def port(text: str) -> int:
    """A TCP port, 1..65535."""
    value = _int(text, minimum=1, what="a port number in 1..65535")
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 1..65535, got {text!r}")
    return value


_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def host(text: str) -> str:
    """An interface to bind: an IPv4 or IPv6 address or a host name (``256.1.1.1`` is neither)."""
    value = text.strip()
    if re.fullmatch(r"[0-9.]+", value) or ":" in value:  # looks like an address: it must be a valid one
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid IP address or host name") from None
        return value
    labels = value.rstrip(".").split(".")
    if not value or len(value) > 253 or not all(_LABEL.match(label) for label in labels):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid IP address or host name")
    return value


def add_image_source_flags(
    parser: argparse.ArgumentParser, *, ids: str = "ids are paths relative to it"
) -> None:
    """``--images`` (a folder or a list file), ``--root`` and ``--follow-symlinks``: how every command that
    reads a user's image collection names it (:func:`capret.data.image_list.list_images` reads them).

    Args:
        ids: what ``--root`` decides besides the root itself, for its help text.
    """
    parser.add_argument("--images", type=Path, required=True, help="image folder or text file of image paths")
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help=f"folder every image lies under; {ids} (default: the --images folder, or the list file's folder)",
    )
    parser.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read images whose symbolic links point outside the root (refused by default)",
    )
