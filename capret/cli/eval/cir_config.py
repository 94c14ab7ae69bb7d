"""Flags and typed config of ``capret-eval cir`` (light to import: ``--help`` loads no model code; the runner is
:mod:`.cir`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from capret.cli.eval.common import add_device, add_out, add_rerank, config_from


@dataclass
class CirEvalConfig:
    """What ``capret-eval cir`` evaluates (the flags below, typed)."""

    dataset: str  # fashioniq | cirr | circo
    checkpoint: Path | None  # combiner checkpoint or run folder
    root: Path  # dataset root (official layout)
    split: str  # val | test (cirr also test1)
    category: str | None  # FashionIQ category (default: all three)
    gallery_ids: Path | None  # CIRCO gallery ids file
    rerank: str | None  # reranker name
    rerank_topk: int  # how many results the reranker reorders
    batch_size: int  # feature-extraction batch size
    device: str | None  # torch device
    out: Path | None  # output folder (default beside the checkpoint)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from capret.data import list_datasets

    p.add_argument("--dataset", required=True, choices=list_datasets(kind="cir"), help="CIR benchmark")
    p.add_argument("--checkpoint", type=Path, help="combiner checkpoint folder (or run folder)")
    p.add_argument("--root", type=Path, required=True, help="dataset root folder (official layout)")
    p.add_argument("--split", default="val", help="val | test (cirr: also test1); default val")
    p.add_argument(
        "--category", default=None, help="FashionIQ category (dress|shirt|toptee; default all three)"
    )
    p.add_argument(
        "--gallery-ids",
        type=Path,
        help="CIRCO gallery: COCO image-info JSON, JSON list of ids, or text file of ids (default: the image-info "
        "file under --root, else every <id>.jpg in COCO2017_unlabeled/unlabeled2017)",
    )
    add_rerank(p)
    add_device(p)
    add_out(p, "metrics.json, rankings and server files (default: beside the checkpoint)")


def config_from_args(namespace: argparse.Namespace) -> CirEvalConfig:
    return config_from(namespace, CirEvalConfig)
