"""``capret``: umbrella command (``capret quickstart``, ``capret search``, ``capret index build``, ...).

A subcommand lives in its own module ``capret/cli/<name>.py`` with ``add_parser(subparsers)`` (which sets
``run`` as the parser's default) and ``run(args) -> int``, and is registered by one line in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path

from capret.cli.common import add_debug_flag, non_negative_int, positive_float, run_guarded

#: modules of the subcommands (one line each); each has ``add_parser(subparsers)`` (setting ``run`` as the parser's
#: default) and ``run(args) -> int``
SUBCOMMANDS: list[str] = [
    "capret.cli.ablate",
    "capret.cli.catalogue",
    "capret.cli.check_data",
    "capret.cli.convert_checkpoint",
    "capret.cli.convert_xvlm",
    "capret.cli.data",
    "capret.cli.index",
    "capret.cli.oti",
    "capret.cli.search",
    "capret.cli.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capret", description="capret: caption-augmented image retrieval. Subcommands below."
    )
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    qs = sub.add_parser(
        "quickstart",
        help="build the embedded demo dataset (real photographs) and run every stage offline on CPU",
        description="Builds the demo dataset under OUT/data and runs captioning, the training-free baseline, "
        "dual-stream training and reranking, writing OUT/report.json.",
    )
    qs.add_argument(
        "--out", type=Path, default=Path("capret_quickstart"), help="output folder (default: %(default)s)"
    )
    qs.add_argument(
        "--seed", type=non_negative_int, default=0, help="random seed of the demo dataset and training"
    )
    qs.add_argument(
        "--train-seconds",
        type=positive_float,
        default=None,
        help="time budget of the quickstart training (default: stage's own)",
    )
    qs.add_argument(
        "--stages", nargs="*", default=None, help="run only these stages (default: all); see report.json keys"
    )
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "quickstart":
        from capret.quickstart import run_quickstart

        return run_guarded(
            lambda: (
                run_quickstart(args.out, seed=args.seed, stages=args.stages, train_seconds=args.train_seconds)
                and 0
            ),
            debug=args.debug or None,
        )
    if callable(getattr(args, "run", None)):
        return run_guarded(args.run, args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
