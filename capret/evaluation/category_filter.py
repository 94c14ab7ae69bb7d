"""The category-filtered image-only baseline: rank only gallery items of the query's *predicted* category.

This is what a caption that mostly names the garment category could buy without any caption: a category
classifier run on both sides and the image ranking restricted to the matching category. Gallery items of
another predicted category are not removed but ranked after every matching one (their similarity minus
:data:`PENALTY`, more than the whole range of a cosine), so a classifier mistake that hides the true match
costs rank, as it would in a filtered product search, and the metric stays defined for every query.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from capret.evaluation.metrics import map_at_r, mean_average_precision, recall_at_k

__all__ = ["PENALTY", "category_filtered_metrics", "category_filtered_scores"]

#: Subtracted from the similarity of gallery items outside the query's category (cosines span [-1, 1]).
PENALTY = 4.0


def category_filtered_scores(
    query_features: np.ndarray,
    gallery_features: np.ndarray,
    query_categories: Sequence[str],
    gallery_categories: Sequence[str],
) -> torch.Tensor:
    """``[Q, G]`` inner products, minus :data:`PENALTY` where the predicted categories differ."""
    if len(query_categories) != len(query_features) or len(gallery_categories) != len(gallery_features):
        raise ValueError(
            f"{len(query_categories)} query categories for {len(query_features)} queries, "
            f"{len(gallery_categories)} gallery categories for {len(gallery_features)} gallery items"
        )
    names = sorted(set(query_categories) | set(gallery_categories))
    q_cat = torch.tensor([names.index(c) for c in query_categories])
    g_cat = torch.tensor([names.index(c) for c in gallery_categories])
    scores = (
        torch.as_tensor(query_features, dtype=torch.float32)
        @ torch.as_tensor(gallery_features, dtype=torch.float32).T
    )
    return scores - PENALTY * (q_cat[:, None] != g_cat[None, :]).float()


def category_filtered_metrics(
    query_features: np.ndarray,
    gallery_features: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    query_categories: Sequence[str],
    gallery_categories: Sequence[str],
    ks: Sequence[int] = (1, 5, 10, 20),
) -> dict[str, Any]:
    """mAP, MAP@R and R@k of the category-restricted ranking (queries without a relevant item excluded)."""
    scores = category_filtered_scores(query_features, gallery_features, query_categories, gallery_categories)
    relevance = torch.as_tensor(np.asarray(query_labels)[:, None] == np.asarray(gallery_labels)[None, :])
    ks = [k for k in ks if k <= scores.shape[1]]
    recalls = recall_at_k(scores, relevance, ks)
    return {
        "map": mean_average_precision(scores, relevance),
        "map_at_r": map_at_r(scores, relevance),
        **{f"recall@{k}": value for k, value in recalls.items()},
        "same_category_gallery_share": float(
            np.mean([np.mean([g == q for g in gallery_categories]) for q in query_categories])
        ),
    }
