"""What the CLI modules share: the console boundary (re-exported from :mod:`capret.console`), the argparse
``type=`` helpers that check every numeric option's range, and the options several commands take alike.

Each helper parses one option value and raises ``argparse.ArgumentTypeError`` with the valid range, so argparse
prints one line naming the option (``argument --steps: must be a whole number >= 1, got '0'``) and exits 2 before
any work starts. Writing them once keeps ``--max-upload-mb -1`` or ``--steps 0`` from reaching a library that
would turn them into a silent empty result.
"""

from __future__ import annotations

import argparse
import inspect
import ipaddress
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from capret.console import NotAvailableError, add_debug_flag, fail, print_json, run_guarded

__all__ = [
    "NotAvailableError",
    "add_bad_image_flag",
    "add_caption_coverage_flag",
    "add_command",
    "add_debug_flag",
    "add_device_flag",
    "add_image_source_flags",
    "call_with_flags",
    "doc_body",
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

T = TypeVar("T")


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


def doc_body(doc: str | None) -> str | None:
    """A command module's docstring without its first paragraph, the one-line summary the command list already
    shows as ``help=``; the rest is the ``--help`` description."""
    return doc.split("\n\n", 1)[1] if doc and "\n\n" in doc else doc


def add_command(
    subparsers: Any,
    module: str,
    *,
    help: str,
    run: Callable[[argparse.Namespace], int] | None = None,
    summary: bool = True,
) -> argparse.ArgumentParser:
    """The parser of the subcommand a ``capret/cli/<name>.py`` module implements (``module`` is its ``__name__``).

    The command is named after the module (``convert_checkpoint`` -> ``convert-checkpoint``) and its ``--help``
    prints the module docstring with the line breaks it was written with, so neither is restated per command.

    Args:
        help: the one line of the parent's command list.
        run: what the parsed command calls (``args.run(args)``); None where its actions set their own.
        summary: keep the docstring's first paragraph; False drops it (it says what ``help`` says).
    """
    doc = sys.modules[module].__doc__
    parser: argparse.ArgumentParser = subparsers.add_parser(
        module.rsplit(".", 1)[-1].replace("_", "-"),
        help=help,
        description=doc if summary else doc_body(doc),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if run is not None:
        parser.set_defaults(run=run)
    return parser


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


def add_device_flag(parser: argparse.ArgumentParser, *, local_rank: bool = False) -> None:
    """``--device``; unset, :func:`capret.io.default_device` picks CUDA when there is one, else the CPU.

    Args:
        local_rank: the command runs under ``torchrun`` too, where the default is ``cuda:LOCAL_RANK``.
    """
    cuda = "cuda:LOCAL_RANK" if local_rank else "cuda"
    parser.add_argument(
        "--device", default=None, help=f"torch device (default: {cuda} if available else cpu)"
    )


def add_bad_image_flag(parser: argparse.ArgumentParser, *, skipped: str) -> None:
    """``--on-bad-image error|skip``, the policies of :data:`capret.data.imagefile.BAD_IMAGE_POLICIES`.

    Args:
        skipped: what the command does with an image it leaves out, for the help text ("list it in the manifest").
    """
    from capret.data.imagefile import BAD_IMAGE_POLICIES

    parser.add_argument(
        "--on-bad-image",
        choices=list(BAD_IMAGE_POLICIES),
        default="error",
        help=f"an unreadable image: stop naming it (error, default) or leave it out and {skipped} (skip)",
    )


def add_caption_coverage_flag(parser: argparse.ArgumentParser, *, items: str) -> None:
    """``--min-caption-coverage``: a caption store keyed by other ids (another split, renamed files) joins almost
    nothing and would silently turn a caption run into an image-only one, so too low a share is an error.

    Args:
        items: what the store's captions are joined to, for the help text ("images", "items").
    """
    parser.add_argument(
        "--min-caption-coverage",
        type=fraction,
        default=0.5,
        help=f"with --captions: the smallest fraction of {items} that must find a caption (default 0.5)",
    )


def call_with_flags(fn: Callable[..., T], args: argparse.Namespace, *positional: Any, **given: Any) -> T:
    """``fn(*positional, **given, ...)`` with every other parameter of ``fn`` taken from the flag of the same name.

    A command whose flags are named after the parameters of the library function it runs (``--cir-identities``
    -> ``cir_identities``) needs no hand-written list of ``name=args.name``: the signature is the mapping, so a
    parameter added to the function and given a flag reaches it without a third edit. A parameter with no flag of
    its name keeps its default (one without a default then fails as a missing argument, a bug of the command).

    Args:
        positional: ``fn``'s leading positional arguments.
        given: values computed by the command instead of read from a flag (``progress=...``).
    """
    params = list(inspect.signature(fn).parameters.values())[len(positional) :]
    flags = {
        p.name: getattr(args, p.name)
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in given
        and hasattr(args, p.name)
    }
    return fn(*positional, **flags, **given)
