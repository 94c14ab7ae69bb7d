"""Quickstart stage ``baseline``: a training-free colour + texture descriptor, scored by both evaluators.

The descriptor is the kind of hand-made global feature that content-based image retrieval used before deep
features (colour histograms, Swain & Ballard 1991; gradient-orientation histograms, Dalal & Triggs 2005): an
HSV joint histogram of the item crop plus a 2x2-cell histogram of gradient orientations, each square-rooted
(the Hellinger kernel, as in RootSIFT, Arandjelovic & Zisserman 2012) and the concatenation L2-normalised so
that inner product is the similarity every index in capret expects. It needs no weights and takes
milliseconds per item, so it is an honest floor for the trained models of the later stages.

The stage ranks the demo validation gallery with it, reports mAP and recall@k (GT-box protocol), writes the
same ranking as an official DeepFashion2 result file, scores that with the official algorithm and insists the
two agree (with ground-truth boxes they must), and draws the retrieval grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from capret.data.pixel_stats import hsv_histogram, orientation_histogram
from capret.errors import DataError
from capret.quickstart import QuickstartContext

__all__ = ["baseline_descriptor", "run", "HSV_BINS", "ORIENTATION_BINS", "TILE"]

#: Hue, saturation and value bins of the joint colour histogram.
HSV_BINS = (8, 4, 4)
#: Unsigned gradient orientation bins per cell (2 x 2 cells).
ORIENTATION_BINS = 8
#: Side of the square each crop is resized to before describing it.
TILE = 64
#: Weight of the texture part relative to the colour part (both are unit-L1 before square-rooting).
TEXTURE_WEIGHT = 0.7


def baseline_descriptor(images: Sequence[Image.Image]) -> np.ndarray:
    """``[N, 160]`` float32 L2-normalised colour + texture descriptors of item crops (see the module docstring).

    Deterministic and stateless, so the reranking stage can recompute the same global ranking.
    """
    rows = []
    for image in images:
        tile = image.convert("RGB").resize((TILE, TILE), Image.Resampling.BILINEAR)
        colour = np.sqrt(hsv_histogram(tile, HSV_BINS))
        texture = np.sqrt(orientation_histogram(tile, ORIENTATION_BINS)) * TEXTURE_WEIGHT
        vec = np.concatenate([colour, texture])
        rows.append(vec / max(np.linalg.norm(vec), 1e-12))
    dim = int(np.prod(HSV_BINS)) + 4 * ORIENTATION_BINS
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)


def _crops(root: Any, split: str, items: Sequence[Any]) -> list[Image.Image]:
    from capret.data.deepfashion2 import crop_item, open_image

    cache: dict[int, Image.Image] = {}
    crops = []
    for item in items:
        if item.image_id not in cache:
            cache[item.image_id] = open_image(root, split, item.image_id)
        crops.append(crop_item(cache[item.image_id], item.bbox))
    return crops


def run(ctx: QuickstartContext) -> dict[str, Any]:
    """Describe, index, evaluate (GT-box mAP/R@k and official top-k) and draw the demo validation split."""
    from capret.data.deepfashion2 import gt_box_protocol, image_path, load_items
    from capret.evaluation.deepfashion2 import evaluate_gt_boxes
    from capret.evaluation.visualize import plot_retrieval_grid
    from capret.retrieval.index import create_index

    split = "validation"
    items = load_items(ctx.data_root, split, progress=False)
    queries, gallery = gt_box_protocol(items)
    if not queries.items or not gallery.items:
        raise DataError(f"{ctx.data_root / split}: the GT-box protocol found no query or no gallery item")
    query_features = baseline_descriptor(_crops(ctx.data_root, split, queries.items))
    gallery_features = baseline_descriptor(_crops(ctx.data_root, split, gallery.items))

    index = create_index("flat", gallery_features.shape[1])
    index.add(gallery_features, np.arange(len(gallery.items), dtype=np.int64))
    index.save(ctx.out_dir / "baseline_gallery.index")

    ks = [k for k in (1, 5, 10, 20) if k <= len(gallery.items)]
    metrics = evaluate_gt_boxes(
        query_features,
        gallery_features,
        queries.items,
        gallery.items,
        ks=ks,
        results_path=ctx.out_dir / "baseline_retrieval_results.json",
    )
    mismatched = [k for k in ks if metrics[f"official_top{k}"] != metrics[f"recall@{k}"]]
    if mismatched:
        raise RuntimeError(
            "official DeepFashion2 top-k differs from recall@k on ground-truth boxes at k="
            f"{mismatched}: "
            + ", ".join(
                f"top{k}={metrics[f'official_top{k}']} vs R@{k}={metrics[f'recall@{k}']}" for k in mismatched
            )
        )

    # the flat index gives the ranking drawn in the grid (same similarity as the evaluator's exact search)
    top = min(5, len(gallery.items))
    _, ranking = index.search(query_features, top)
    hits = gallery.labels[ranking] == queries.labels[:, None]
    query_refs = [(str(image_path(ctx.data_root, split, it.image_id)), it.bbox) for it in queries.items]
    gallery_refs = [(str(image_path(ctx.data_root, split, it.image_id)), it.bbox) for it in gallery.items]
    step = max(1, len(queries.items) // 8)
    grid = plot_retrieval_grid(
        ctx.out_dir / "baseline_grid.png",
        query_images=query_refs,
        gallery_images=gallery_refs,
        ranking=ranking,
        hits=hits,
        query_indices=list(range(0, len(queries.items), step))[:8],
        k=top,
        title="baseline (HSV + gradient histograms): top-5, green = same identity",
    )
    ctx.state["baseline"] = {
        "query_features": query_features,
        "gallery_features": gallery_features,
        "query_labels": queries.labels,
        "gallery_labels": gallery.labels,
        "query_images": query_refs,
        "gallery_images": gallery_refs,
        "query_items": queries.items,
        "gallery_items": gallery.items,
    }
    return {
        "map": metrics["map"],
        "recall@1": metrics["recall@1"],
        "recall@5": metrics["recall@5"],
        "recall@10": metrics["recall@10"],
        "official_top1": metrics["official_top1"],
        "official_top10": metrics["official_top10"],
        "grid_png": str(grid),
    }
