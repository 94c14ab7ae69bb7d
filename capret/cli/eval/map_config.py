"""Flags and typed config of ``capret-eval map``, shared by its two sources (:mod:`.features`,
:mod:`.checkpoint`); light to import, the runner is :mod:`.retrieval`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from capret.cli.common import add_bad_image_flag, add_caption_coverage_flag, fraction
from capret.cli.eval.common import add_device, add_ks, add_out, add_rerank, config_from, indexes


@dataclass
class MapEvalConfig:
    """What ``capret-eval map`` evaluates (the flags below, typed)."""

    metric: str  # map
    query_features: Path | None  # [Q, D] .npy query embeddings (features source)
    gallery_features: Path | None  # [G, D] .npy gallery embeddings
    query_labels: Path | None  # [Q] .npy identity labels
    gallery_labels: Path | None  # [G] .npy identity labels
    query_images: Path | None  # image list for geometric reranking of saved features
    gallery_images: Path | None  # image list for geometric reranking of saved features
    checkpoint: Path | None  # trained dual-stream model (checkpoint source)
    dataset: str | None  # deepfashion2 | demo (checkpoint source)
    root: Path | None  # dataset root (checkpoint source)
    split: str | None  # split (default validation)
    captions: Path | None  # caption store joined to items by key
    no_captions: bool  # image-only path (caption ablation)
    corrupt_captions: list[str] | None  # caption corruption modes to sweep (checkpoint source)
    corrupt_rates: list[float]  # shares of corrupted captions for corrupt_captions
    min_caption_coverage: float  # a caption store joining fewer items than this fraction is an error
    on_bad_image: str  # error | skip: what an unreadable image does (checkpoint source)
    ks: list[int]  # R@k cut-offs
    index: str  # search backend
    rerank: str | None  # reranker name
    rerank_topk: int  # how many results the reranker reorders
    batch_size: int  # feature-extraction batch size
    device: str | None  # torch device
    out: Path | None  # output folder


def add_arguments(p: argparse.ArgumentParser) -> None:
    from capret.data import list_datasets

    p.add_argument("--metric", choices=["map"], default="map", help="the metric family (map)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--query-features", type=Path, help="[Q, D] .npy query embeddings")
    source.add_argument("--checkpoint", type=Path, help="trained dual-stream model folder (or run folder)")
    p.add_argument("--gallery-features", type=Path, help="[G, D] .npy gallery embeddings")
    p.add_argument("--query-labels", type=Path, help="[Q] .npy integer identity labels of the queries")
    p.add_argument("--gallery-labels", type=Path, help="[G] .npy integer identity labels of the gallery")
    p.add_argument(
        "--query-images", type=Path, help="text file, one query image path per line (geometric rerank)"
    )
    p.add_argument("--gallery-images", type=Path, help="text file, one gallery image path per line")
    p.add_argument("--dataset", choices=list_datasets(kind="items"), help="dataset (with --checkpoint)")
    p.add_argument("--root", type=Path, help="dataset root folder (DeepFashion2 layout)")
    p.add_argument("--split", default=None, help="split (default: validation)")
    p.add_argument("--captions", type=Path, help="caption store JSONL joined to items by key")
    p.add_argument(
        "--no-captions", action="store_true", help="evaluate the image-only path (caption ablation)"
    )
    p.add_argument(
        "--corrupt-captions",
        nargs="+",
        choices=["shuffle", "drop", "replace"],
        help="with --checkpoint: also report metrics with these caption corruptions at --corrupt-rates",
    )
    p.add_argument(
        "--corrupt-rates",
        type=fraction,
        nargs="+",
        default=[0.0, 0.25, 0.5, 1.0],
        help="shares of corrupted captions for --corrupt-captions (default 0 0.25 0.5 1)",
    )
    add_caption_coverage_flag(p, items="items")
    add_bad_image_flag(p, skipped="report it")
    add_ks(p)
    p.add_argument("--index", default="exact", choices=indexes(), help="search backend (default: exact)")
    add_rerank(p)
    add_device(p)
    add_out(p, "metrics.json, official results, features and pictures")


def config_from_args(namespace: argparse.Namespace) -> MapEvalConfig:
    return config_from(namespace, MapEvalConfig)
