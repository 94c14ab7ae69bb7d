"""Composed-image-retrieval inference: compose queries with CLIP + a fuser and rank a benchmark's gallery.

Shared by the ``combiner`` training task (validation for model selection) and ``capret-eval --dataset
fashioniq|cirr|circo``. A *fuser* is any module ``fuse(image_features, text_features) -> normalised query``
(the CLIP4Cir Combiner, or the element-wise sum used after stage 1). Image and text features come from
:mod:`capret.engine.feature_cache`, so a gallery is encoded once per model (and preprocessing) even across
runs, and :func:`capret.evaluation.cir.rank_gallery` turns queries into rankings chunk by chunk. The results are
exactly what the metric functions and submission writers of :mod:`capret.evaluation.cir` take.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capret.engine.feature_cache import CachedFeatures, image_features, text_features
from capret.evaluation.cir import rank_gallery
from capret.models.clip import ClipBundle

__all__ = [
    "CIRRanking",
    "FeatureOptions",
    "circo_rankings",
    "cirr_rankings",
    "compose_queries",
    "fashioniq_rankings",
    "rank_cir_queries",
]

#: every official protocol reads at most the top 50 (R@50, CIRR/CIRCO submission files)
TOP_K = 50


@dataclass
class FeatureOptions:
    """How features are computed: cache folder, precomputed weight fingerprints, batch size and workers."""

    cache_dir: str | Path | None = None
    cache_texts: bool = True  # False while the text encoder is being trained (stage-1 validation)
    image_fingerprint: str | None = None
    text_fingerprint: str | None = None
    batch_size: int = 64
    num_workers: int = 0


@dataclass
class CIRRanking:
    """Top-``k`` gallery names per query (best first), with the queries and gallery used to make them."""

    names: list[list[str]]
    queries: torch.Tensor  # [Q, d] normalised composed queries
    gallery: CachedFeatures  # normalised gallery features


@torch.no_grad()
def compose_queries(
    fuser: nn.Module,
    *,
    images: torch.Tensor,
    texts: torch.Tensor,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Normalised composed queries ``[Q, d]`` from raw reference-image and text features (fuser in eval mode)."""
    was_training = fuser.training
    fuser.eval()
    out = [
        fuser(images[i : i + batch_size].to(device), texts[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    fuser.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, images.shape[1])


def rank_cir_queries(
    clip: ClipBundle,
    fuser: nn.Module,
    *,
    references: Sequence[str],
    captions: Sequence[str],
    gallery: Sequence[str],
    load_image: Callable[[str], Any],
    k: int = TOP_K,
    exclude_reference: bool = False,
    options: FeatureOptions | None = None,
) -> CIRRanking:
    """Rank ``gallery`` for every (reference, caption) query with CLIP + ``fuser``.

    Images needed by queries and gallery are encoded together once (through the feature cache when
    ``options.cache_dir`` is set); texts are encoded once per unique caption. With ``exclude_reference`` the
    query's own reference image never appears in its ranking (CIRR protocol).
    """
    opts = options or FeatureOptions()
    if len(references) != len(captions):
        raise ValueError(f"{len(references)} references but {len(captions)} captions")
    names = list(dict.fromkeys([*gallery, *references]))
    images = image_features(
        clip,
        names,
        load_image=load_image,
        cache_dir=opts.cache_dir,
        fingerprint=opts.image_fingerprint,
        batch_size=opts.batch_size,
        num_workers=opts.num_workers,
    )
    text_cache = opts.cache_dir if opts.cache_texts else None
    texts = text_features(clip, captions, cache_dir=text_cache, fingerprint=opts.text_fingerprint)
    queries = compose_queries(
        fuser, images=images.lookup(references), texts=texts.lookup(captions), device=clip.device
    )
    gallery_feats = CachedFeatures(list(gallery), F.normalize(images.lookup(gallery), dim=-1))
    ranked = rank_gallery(
        queries,
        gallery_feats.features,
        gallery_feats.names,
        top_n=k,
        exclude=list(references) if exclude_reference else None,
    )
    return CIRRanking(names=ranked, queries=queries, gallery=gallery_feats)


def fashioniq_rankings(
    clip: ClipBundle, fuser: nn.Module, *, dataset: Any, k: int = TOP_K, options: FeatureOptions | None = None
) -> list[list[str]]:
    """Top-``k`` asins of the category gallery per triplet, in caption-file order (reference kept, as in
    CLIP4Cir's FashionIQ protocol); captions are paired ``"C1 and c2"``."""
    triplets = dataset.triplets
    return rank_cir_queries(
        clip,
        fuser,
        references=[t.reference for t in triplets],
        captions=[t.caption for t in triplets],
        gallery=dataset.gallery,
        load_image=dataset.load_image,
        k=k,
        options=options,
    ).names


def cirr_rankings(
    clip: ClipBundle, fuser: nn.Module, *, dataset: Any, k: int = TOP_K, options: FeatureOptions | None = None
) -> dict[int, list[str]]:
    """pairid -> ranking over the whole split with the reference removed (CIRR protocol).

    Each ranking is the top ``k`` followed by the query's remaining ``img_set`` members in score order, so it
    is a prefix of the full ranking *restricted* to what Recall_subset needs: both ``cirr_metrics`` and the
    ``recall_subset`` submission writer can read it without ranking the whole gallery per query.
    """
    triplets = dataset.triplets
    result = rank_cir_queries(
        clip,
        fuser,
        references=[t.reference for t in triplets],
        captions=[t.caption for t in triplets],
        gallery=dataset.gallery,
        load_image=dataset.load_image,
        k=k,
        exclude_reference=True,
        options=options,
    )
    out: dict[int, list[str]] = {}
    for i, (t, ranking) in enumerate(zip(triplets, result.names)):
        listed = set(ranking)
        rest = [m for m in dict.fromkeys(t.members) if m != t.reference and m not in listed]
        if rest:
            scores = result.gallery.lookup(rest) @ result.queries[i]
            order = torch.sort(scores, descending=True, stable=True).indices.tolist()
            ranking = ranking + [rest[j] for j in order]
        out[t.query_id] = ranking
    return out


def circo_rankings(
    clip: ClipBundle,
    fuser: nn.Module,
    *,
    dataset: Any,
    k: int = TOP_K,
    exclude_reference: bool = False,
    options: FeatureOptions | None = None,
) -> dict[int, list[int]]:
    """query id -> top-``k`` COCO ids of the gallery.

    The official CIRCO evaluation (SEARLE's ``circo_compute_val_metrics``) ranks the whole gallery without
    removing the reference, hence ``exclude_reference=False`` by default.
    """
    queries = dataset.queries
    gallery = [str(g) for g in dataset.gallery]
    result = rank_cir_queries(
        clip,
        fuser,
        references=[str(q.reference) for q in queries],
        captions=[q.caption for q in queries],
        gallery=gallery,
        load_image=lambda name: dataset.load_image(int(name)),
        k=k,
        exclude_reference=exclude_reference,
        options=options,
    )
    return {q.query_id: [int(n) for n in ranking] for q, ranking in zip(queries, result.names)}
