"""``capret data garments --out DIR --seed S [--identities N] [--size PX] ...``: render the garment world.

Writes DeepFashion2-layout train/validation splits, a FashionIQ-layout composed-retrieval split, an image-text
pretraining split, ``truth.json`` and ``world.json`` under DIR (see docs/garments.md) and prints the summary
(counts, seconds, images per second) as JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from capret.cli.common import call_with_flags, doc_body, print_json
from capret.progress import NO_PROGRESS_HELP, progress_enabled


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "data",
        help="generate datasets (garments: the rendered garment world)",
        description="Generate datasets. 'garments' renders the garment world: DeepFashion2, FashionIQ and "
        "image-text splits whose attributes live in the pixels (docs/garments.md).",
    )
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    g = kinds.add_parser(
        "garments",
        help="render the garment world into DIR",
        description=doc_body(__doc__),
    )
    g.add_argument(
        "--out", type=Path, required=True, help="output folder (an earlier world there is replaced)"
    )
    g.add_argument("--seed", type=int, required=True, help="seed: same seed and options give identical files")
    g.add_argument(
        "--identities", type=int, default=120, help="DeepFashion2 identities (default: %(default)s)"
    )
    g.add_argument(
        "--cir-identities", type=int, default=None, help="FashionIQ images (default: --identities)"
    )
    g.add_argument(
        "--pretrain-identities",
        type=int,
        default=None,
        help="image-text identities (default: 2 x --identities)",
    )
    g.add_argument(
        "--size", type=int, default=256, help="consumer photo side in pixels (default: %(default)s)"
    )
    g.add_argument("--shop-size", type=int, default=None, help="shop/product image side (default: --size)")
    g.add_argument(
        "--user-views", type=int, default=3, help="consumer photos per identity (default: %(default)s)"
    )
    g.add_argument(
        "--validation-fraction", type=float, default=0.35, help="families held out (default: %(default)s)"
    )
    g.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    g.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from capret.data.garments import build_world

    summary = call_with_flags(build_world, args, args.out, progress=progress_enabled(not args.no_progress))
    print_json(summary.to_dict())
    return 0
