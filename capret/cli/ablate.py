"""``capret ablate --config X.yaml --variants V.yaml --seeds 3 --out DIR [key=value ...]``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from capret.cli.common import call_with_flags, positive_int, print_json, run_guarded
from capret.console import add_progress_flag, progress_wanted


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ablate",
        help="train and evaluate named config variants over seeds; mean +- std table and bar chart",
        description="Runs every (variant, seed) of a variants YAML on top of a dual-stream config, skipping "
        "finished runs (DIR/runs/<variant>/seed<n>/result.json), and writes DIR/ablation.json, DIR/ablation.md "
        "and DIR/ablation.png. See configs/ablation_demo_variants.yaml.",
    )
    parser.add_argument("--config", type=Path, required=True, help="base dual-stream YAML config")
    parser.add_argument("--variants", type=Path, required=True, help="variants YAML (name + overrides)")
    parser.add_argument(
        "--seeds", type=positive_int, default=3, help="number of seeds 0..n-1 (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (resumable)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variant names")
    add_progress_flag(parser)
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides of the base config for every variant"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    def go() -> int:
        from capret.locks import exclusive_output
        from capret.tasks.ablation import run_ablation

        # One writer per ablation folder: two ablations into one --out would interleave their runs and tables.
        with exclusive_output(args.out, what="ablation folder"):
            summary = call_with_flags(run_ablation, args, out_dir=args.out, progress=progress_wanted(args))
        print_json({k: summary[k] for k in ("json", "markdown", "chart", "skipped_finished_runs", "table")})
        return 0

    return run_guarded(go)
