"""``capret check-data --dataset NAME --root DIR --split SPLIT``: scan a dataset before a long run.

Reports every unreadable image and every invalid annotation (unparsable files, missing or mistyped fields,
NaN/Inf boxes, boxes outside their image) as JSON, and exits 1 when there is any, 0 when the split is clean.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from capret.cli.common import call_with_flags, doc_body, non_negative_int, print_json


def add_parser(subparsers: Any) -> None:
    from capret.data.check import CHECKABLE_DATASETS

    p = subparsers.add_parser(
        "check-data",
        help="scan a dataset split for unreadable images and invalid annotations before a long run",
        description=doc_body(__doc__),
    )
    p.add_argument("--dataset", required=True, choices=CHECKABLE_DATASETS, help="dataset layout")
    p.add_argument("--root", type=Path, required=True, help="dataset root folder")
    p.add_argument(
        "--split", required=True, help="split to check (deepfashion2: train|validation; CIR: val|...)"
    )
    p.add_argument("--category", default=None, help="FashionIQ category (default: all three)")
    p.add_argument("--no-images", action="store_true", help="check annotations only (no image decoding)")
    p.add_argument(
        "--max-problems",
        type=non_negative_int,
        default=200,
        help="problems printed in full (all are counted)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from capret.data.check import check_dataset
    from capret.progress import progress_enabled

    report = call_with_flags(
        check_dataset, args, args.dataset, images=not args.no_images, progress=progress_enabled()
    )
    out = report.to_dict()
    out["problems"] = out["problems"][: max(0, args.max_problems)]
    print_json(out)
    return 0 if report.ok else 1
