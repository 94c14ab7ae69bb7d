"""``capret-eval map --checkpoint CKPT --dataset deepfashion2|demo --root DIR --split validation``.

Embeds the ground-truth-box protocol items of the split (user items with style > 0 query shop items with
style > 0) with a trained dual-stream model, with captions from ``--captions`` (or none with ``--no-captions``,
the caption ablation), and reports mAP / MAP@R / R@k (``capret.evaluation.retrieval_eval``), optionally before
and after ``--rerank``. With ``--out`` it also writes ``metrics.json``, the features and labels (``.npy``) and
the ranking in the official DeepFashion2 submission format (``results.json``), scored by the official-protocol
evaluator (``official_top{k}``; with ground-truth boxes it must equal R@k). ``caption_source`` counts the
store's records by how they were made (``pixels`` or ``oracle-attributes``). ``--corrupt-captions shuffle drop
replace --corrupt-rates 0 0.25 0.5 1`` adds ``caption_corruption``: the metrics per corruption mode and rate
(:func:`capret.inference.dualstream.robustness.caption_corruption_sweep`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from capret.cli.eval.common import require, search_flags
from capret.cli.eval.map_config import MapEvalConfig
from capret.config import ConfigError
from capret.progress import progress_enabled


def _pictures(args: MapEvalConfig, result: Any, *, ks: list[int]) -> dict[str, str]:
    """Recall@k curve (before/after with --rerank) and a retrieval grid of the global ranking."""
    from capret.data.deepfashion2 import image_path
    from capret.evaluation.visualize import plot_recall_curve, plot_retrieval_grid

    split = args.split or "validation"
    root, out = require(args.root, "--root"), require(args.out, "--out")
    metrics = result.metrics
    sides = ("before", "after") if "before" in metrics else (None,)
    curves = {
        side or "recall@k": {k: (metrics[side] if side else metrics)[f"recall@{k}"] for k in ks}
        for side in sides
    }
    top = min(5, len(result.gallery_items))
    ranking = np.argsort(-(result.query_features @ result.gallery_features.T), axis=1, kind="stable")[:, :top]
    hits = result.gallery_labels[ranking] == result.query_labels[:, None]

    def refs(items: list[Any]) -> list[tuple[str, Any]]:
        return [(str(image_path(root, split, it.image_id)), it.bbox) for it in items]

    grid = plot_retrieval_grid(
        out / "retrieval_grid.png",
        query_images=refs(result.query_items),
        gallery_images=refs(result.gallery_items),
        ranking=ranking,
        hits=hits,
        k=top,
        title=f"{args.checkpoint}: top-{top} of the global ranking, green = same identity",
    )
    recall = plot_recall_curve(out / "recall_at_k.png", curves)
    return {"grid_png": str(grid), "recall_png": str(recall)}


def _box_metrics(
    args: MapEvalConfig, model: Any, result: Any, *, split: str, device: Any
) -> dict[str, float]:
    """Grounding quality of the text-conditioned box head on the captioned query and gallery items."""
    from capret.data.captions import join_captions
    from capret.inference.dualstream.encoding import box_quality, predict_item_boxes

    items = [*result.query_items, *result.gallery_items]
    pred, target = predict_item_boxes(
        model,
        root=require(args.root, "--root"),
        split=split,
        items=items,
        captions=join_captions(items, args.captions).captions,
        batch_size=args.batch_size,
        device=device,
    )
    return box_quality(pred, target)


def run(args: MapEvalConfig) -> dict[str, Any]:
    from capret.data.caption_records import caption_sources
    from capret.inference.dualstream.encoding import evaluate_items, load_model
    from capret.inference.dualstream.robustness import caption_corruption_sweep

    if args.dataset is None:
        raise ConfigError("--checkpoint evaluation needs --dataset deepfashion2|demo (DeepFashion2 layout)")
    if args.root is None:
        raise ConfigError(
            "--root is required: the dataset folder in DeepFashion2 layout (<root>/<split>/annos)"
        )
    if args.captions is not None and args.no_captions:
        raise ConfigError("--captions and --no-captions exclude each other")
    split = args.split or "validation"
    model = load_model(require(args.checkpoint, "--checkpoint"), device=args.device)
    result = evaluate_items(
        model.model,
        root=args.root,
        split=split,
        captions=None if args.no_captions else args.captions,
        ks=args.ks,
        batch_size=args.batch_size,
        device=model.device,
        **search_flags(args),
        progress=progress_enabled(),
        min_caption_coverage=args.min_caption_coverage,
        on_bad_image=args.on_bad_image,
    )
    metrics: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "dataset": args.dataset,
        "split": split,
        "captions": "none" if args.captions is None or args.no_captions else str(args.captions),
        **result.captions,
        **result.metrics,
    }
    if args.captions is not None and not args.no_captions:
        metrics["caption_source"] = caption_sources(args.captions)
        metrics.update(_box_metrics(args, model.model, result, split=split, device=model.device))
    if args.corrupt_captions:
        if args.captions is None or args.no_captions:
            raise ConfigError("--corrupt-captions needs --captions (the captions to corrupt)")
        metrics["caption_corruption"] = caption_corruption_sweep(
            model.model, root=args.root, split=split, captions=args.captions, modes=args.corrupt_captions,
            rates=args.corrupt_rates, ks=args.ks, batch_size=args.batch_size, device=model.device,
        )  # fmt: skip
    if args.out is not None:
        from capret.evaluation.deepfashion2 import evaluate_gt_boxes

        args.out.mkdir(parents=True, exist_ok=True)
        ks = sorted(
            {k for k in args.ks if k <= len(result.gallery_items)} | {min(20, len(result.gallery_items))}
        )
        official = evaluate_gt_boxes(
            result.query_features,
            result.gallery_features,
            result.query_items,
            result.gallery_items,
            ks=ks,
            results_path=args.out / "results.json",
        )
        metrics.update({k: v for k, v in official.items() if k.startswith("official_")})
        metrics["results"] = str(args.out / "results.json")
        if args.rerank:
            # evaluate_gt_boxes ranks by the fused features; the reranked order is reported under "after".
            metrics["official_ranking"] = "global (before --rerank)"
        metrics.update(_pictures(args, result, ks=sorted(set(args.ks))))
        for name, array in (
            ("query_features", result.query_features),
            ("gallery_features", result.gallery_features),
            ("query_labels", result.query_labels),
            ("gallery_labels", result.gallery_labels),
        ):
            np.save(args.out / f"{name}.npy", array)
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return metrics
