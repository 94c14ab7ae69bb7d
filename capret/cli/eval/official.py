"""``capret-eval official`` (or ``--protocol deepfashion2``): the official consumer-to-shop top-k.

Two sources, exactly one of them:

* ``--results R.json --query-gt Q.json --gallery-gt G.json`` scores an official-format result file;
* ``--checkpoint MODEL --root DF2 --split validation (--detector DET | --detections dets.json) --out DIR`` runs
  the protocol from raw images (:func:`capret.inference.dualstream.detected.evaluate_detected`): detect (a trained
  detector folder, or the COCO results file of an external detector), caption each detection (``--captions``
  backend, cached), embed, search, optionally ``--rerank``, and write ``results.json`` and its top-k.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capret.cli.common import non_negative_float, non_negative_int, positive_int
from capret.cli.eval.common import (
    DEFAULT_KS,
    add_device,
    add_ks,
    add_out,
    add_rerank,
    config_from,
    flags_where,
    indexes,
    require,
    search_flags,
)
from capret.config import ConfigError
from capret.progress import progress_enabled


@dataclass
class OfficialEvalConfig:
    """What ``capret-eval official`` scores (the flags below, typed)."""

    protocol: str  # the official protocol (deepfashion2)
    results: Path | None  # official-format retrieval results JSON (result-file source)
    checkpoint: Path | None  # dual-stream model folder (raw-image source)
    root: Path | None  # dataset root in the DeepFashion2 layout (raw-image source)
    split: str | None  # split (default validation)
    detector: Path | None  # trained detector folder (capret.load_detector)
    detections: Path | None  # COCO results file of an external detector
    score_threshold: float  # detections below this score are dropped
    max_items: int  # most detections kept per image
    captions: str  # caption backend for every detection, or none
    caption_option: list[str]  # backend keyword options KEY=VALUE
    caption_store: Path | None  # caption cache (default <out>/captions.jsonl)
    caption_rounds: int | None  # dialogue rounds (None: the loop's default)
    index: str  # search backend
    top: int  # retrieved entries written per query detection
    query_gt: Path | None  # query_gt.json
    gallery_gt: Path | None  # gallery_gt.json
    legacy_singleton_bug: bool  # reproduce the published script's singleton-identity failure
    ks: list[int]  # cut-offs (default: the official 1 5 10 15 20)
    rerank: str | None  # reranker of the raw-image source (a result file has nothing to rerank with)
    rerank_topk: int  # how many results the reranker reorders
    batch_size: int  # embedding batch size
    device: str | None  # torch device
    out: Path | None  # write metrics.json and a curve here (results.json too for the raw-image source)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--protocol",
        choices=["deepfashion2"],
        default="deepfashion2",
        help="official protocol (deepfashion2)",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--results", type=Path, help="official-format retrieval results JSON to score")
    source.add_argument(
        "--checkpoint", type=Path, help="dual-stream model folder: run the protocol from raw images"
    )
    p.add_argument("--root", type=Path, help="dataset root in the DeepFashion2 layout (with --checkpoint)")
    p.add_argument("--split", default=None, help="split (default: validation)")
    detect = p.add_mutually_exclusive_group()
    detect.add_argument("--detector", type=Path, help="trained detector folder (capret-train task detector)")
    detect.add_argument(
        "--detections",
        type=Path,
        help='COCO results JSON of an external detector: [{"image_id", "category_id", "bbox": xywh, "score"}]',
    )
    p.add_argument(
        "--score-threshold", type=non_negative_float, default=0.05, help="drop detections below this score"
    )
    p.add_argument(
        "--max-items", type=positive_int, default=10, help="most detections kept per image (best first)"
    )
    p.add_argument(
        "--captions",
        choices=["template", "transformers", "openai", "none"],
        default="template",
        help="caption backend run on every detection (default template; none = image-only path)",
    )
    p.add_argument(
        "--caption-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword option of the caption backend (repeatable), e.g. base_url=http://127.0.0.1:8000/v1",
    )
    p.add_argument("--caption-store", type=Path, help="caption cache JSONL (default: <out>/captions.jsonl)")
    p.add_argument(
        "--caption-rounds", type=non_negative_int, default=None, help="dialogue rounds per detection"
    )
    p.add_argument("--index", default="exact", choices=indexes(), help="search backend (default: exact)")
    p.add_argument(
        "--top", type=positive_int, default=20, help="retrieved entries written per query (official: 20)"
    )
    p.add_argument("--query-gt", type=Path, help="query_gt.json (official format)")
    p.add_argument("--gallery-gt", type=Path, help="gallery_gt.json (official format)")
    p.add_argument(
        "--legacy-singleton-bug",
        action="store_true",
        help="reproduce the published DeepFashion2 script exactly, including its failure to score identities "
        "with a single gallery item (default: score them as the protocol describes)",
    )
    add_ks(p)
    add_rerank(p)
    add_device(p)
    add_out(p, "metrics.json and a recall curve (raw images: also results.json, detections, captions)")


def config_from_args(namespace: argparse.Namespace) -> OfficialEvalConfig:
    return config_from(namespace, OfficialEvalConfig)


def _options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` flags as backend keywords (values parsed as YAML scalars: 8 -> int, true -> bool)."""
    from capret.config import parse_overrides

    return parse_overrides(pairs)


def _run_detected(args: OfficialEvalConfig, ks: list[int]) -> dict[str, Any]:
    """The protocol from raw images (see the module docstring)."""
    from capret.inference.dualstream.detected import evaluate_detected
    from capret.inference.dualstream.encoding import load_model
    from capret.io import atomic_write_json

    root = require(args.root, "--root", "the dataset folder in DeepFashion2 layout (<root>/<split>/annos)")
    out = require(args.out, "--out", "the folder for results.json, metrics.json and the caption store")
    if args.detector is None and args.detections is None:
        raise ConfigError("--checkpoint needs a detector: --detector DIR (trained) or --detections dets.json")
    if args.detector is not None:
        from capret.inference.detectors import load_detector

        detector: Any = load_detector(
            args.detector, device=args.device, score_threshold=args.score_threshold, max_items=args.max_items
        )
    else:
        from capret.inference.detectors import CocoResultsDetector

        detector = CocoResultsDetector(
            path=require(args.detections, "--detections"),
            score_threshold=args.score_threshold,
            max_items=args.max_items,
        )
    model = load_model(require(args.checkpoint, "--checkpoint"), device=args.device)
    loop = {"rounds": args.caption_rounds} if args.caption_rounds is not None else None
    result = evaluate_detected(
        model,
        detector,
        root=root,
        split=args.split or "validation",
        out_dir=out,
        captions=None if args.captions == "none" else args.captions,
        caption_options=_options(args.caption_option),
        caption_store=args.caption_store,
        caption_loop=loop,
        query_gt=args.query_gt,
        gallery_gt=args.gallery_gt,
        ks=ks,
        top=max(args.top, ks[-1]),
        **search_flags(args),
        max_items=args.max_items,
        batch_size=args.batch_size,
        progress=progress_enabled(),
    )
    metrics = {
        **result.metrics,
        "checkpoint": str(args.checkpoint),
        "detector": str(args.detector or args.detections),
    }
    atomic_write_json(out / "metrics.json", metrics, indent=2)
    return metrics


def run(args: OfficialEvalConfig) -> dict[str, Any]:
    """Score ``--results``, or run the protocol from raw images with ``--checkpoint``; see the module docstring."""
    from capret.evaluation.deepfashion2 import OFFICIAL_KS, evaluate_retrieval_results

    # --ks left at its default: the cut-offs the official script prints
    ks = list(OFFICIAL_KS) if tuple(args.ks) == DEFAULT_KS else sorted(set(args.ks))
    if args.checkpoint is not None:
        return _run_detected(args, ks)
    stray = flags_where(
        {"--root": args.root, "--detector": args.detector, "--detections": args.detections}, given=True
    )
    if stray:
        raise ConfigError(f"{', '.join(stray)} belong to the raw-image source: add --checkpoint MODEL")

    missing = flags_where(
        {"--results": args.results, "--query-gt": args.query_gt, "--gallery-gt": args.gallery_gt}, given=False
    )
    if args.rerank is not None:
        # A result file holds final rankings without features or images, so there is nothing to rerank with.
        raise ConfigError(
            "--rerank needs features: use the raw-image source (--checkpoint ... --detector/--detections) or "
            "rerank before writing the result file, e.g. capret-eval --metric map "
            "--checkpoint CKPT --dataset deepfashion2 --rerank NAME --out DIR (writes official-format results)"
        )
    if missing:
        raise ConfigError(
            f"--protocol deepfashion2 needs {', '.join(missing)} (official-format JSON files), or --checkpoint "
            "MODEL --root DF2 (--detector DET | --detections dets.json) --out DIR to run it from raw images"
        )
    result = evaluate_retrieval_results(
        require(args.results, "--results"),
        require(args.query_gt, "--query-gt"),
        require(args.gallery_gt, "--gallery-gt"),
        ks=ks,
        legacy_singleton_bug=args.legacy_singleton_bug,
    )
    result = {"protocol": "deepfashion2", "legacy_singleton_bug": args.legacy_singleton_bug, **result}
    if args.out is not None:
        from capret.evaluation.visualize import plot_recall_curve

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(result, indent=2))
        curve = {k: result[f"top{k}"] for k in ks}
        result["recall_png"] = str(
            plot_recall_curve(
                args.out / "recall_at_k.png", {"official top-k": curve}, title="DeepFashion2 official top-k"
            )
        )
    return result
