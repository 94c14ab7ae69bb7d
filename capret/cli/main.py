"""``capret``: umbrella command (``capret quickstart``, ``capret search``, ``capret index build``, ...).

A subcommand lives in its own module ``capret/cli/<name>.py`` with ``add_parser(subparsers)`` (which sets
``run`` as the parser's default) and ``run(args) -> int``, and is registered by one line in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path

from capret.cli.common import add_debug_flag, call_with_flags, non_negative_int, positive_float, run_guarded
from capret.progress import NO_PROGRESS_HELP

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
        help="render the garment world and run every stage offline on CPU",
        description="Renders the garment world under OUT/world and runs one half of the package on it: "
        "--task retrieval (tiny CLIP, captions, baseline, dual stream, detector, rerank, pipeline; "
        "OUT/report.json) or --task cir (tiny CLIP, Combiner and the zero-shot methods; OUT/report_cir.json); "
        "--task all runs both into OUT/report.json.",
    )
    qs.add_argument(
        "--task",
        choices=("retrieval", "cir", "all"),
        default="retrieval",
        help="which half of the package to run (default: %(default)s)",
    )
    qs.add_argument(
        "--world",
        choices=("garments", "demo"),
        default="garments",
        help="garments: the rendered garment world; demo: the earlier photograph demo (no clip/cir stages)",
    )
    qs.add_argument(
        "--out", type=Path, default=Path("capret_quickstart"), help="output folder (default: %(default)s)"
    )
    qs.add_argument(
        "--seed", type=non_negative_int, default=0, help="random seed of the world and of training"
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
    qs.add_argument("--no-progress", dest="progress", action="store_false", help=NO_PROGRESS_HELP)
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "quickstart":
        from capret.quickstart import run_quickstart

        return run_guarded(
            lambda: call_with_flags(run_quickstart, args, args.out) and 0, debug=args.debug or None
        )
    if callable(getattr(args, "run", None)):
        return run_guarded(args.run, args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
