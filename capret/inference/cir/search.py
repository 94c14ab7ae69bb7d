"""Composed-image-retrieval search primitives: compose queries with CLIP + a fuser, rank, rerank, convert.

A *fuser* is any module ``fuse(image_features, text_features) -> normalised query`` (the CLIP4Cir Combiner, or
the element-wise sum used after stage 1). Image and text features come from :mod:`capret.inference.cir.features`,
so a gallery is encoded once per model (and preprocessing) even across runs, and
:func:`capret.evaluation.cir.rank_gallery` turns queries into rankings chunk by chunk.

A global ranking (:class:`CIRRanking`) becomes a metric's input through a benchmark's conversion
(:func:`cirr_with_members`, :func:`circo_ids`, ``.names`` for FashionIQ); :func:`rerank_cir` sits between the
two, so a reranker (:mod:`capret.retrieval.rerank`) reorders the head of the global ranking and the
protocol-specific bookkeeping (CIRR's remaining ``img_set`` members) is applied to the reranked list. The
benchmarks' protocols themselves live in :mod:`capret.inference.cir.benchmarks` (:func:`~capret.inference.cir.
benchmarks.evaluate_cir`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capret.errors import ConfigError
from capret.evaluation.cir import rank_gallery
from capret.evaluation.retrieval_eval import rerank_head
from capret.inference.cir.features import CachedFeatures, image_features, text_features
from capret.models.clip import ClipBundle
from capret.retrieval.rerank import RerankInputs

__all__ = [
    "CIRRanking",
    "FeatureOptions",
    "circo_ids",
    "cirr_with_members",
    "compose_queries",
    "image_refs",
    "rank_cir_queries",
    "rerank_cir",
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


def rerank_cir(
    result: CIRRanking,
    *,
    reranker: str,
    topk: int,
    query_images: Sequence[tuple[str, Any]] | None = None,
    gallery_images: Sequence[tuple[str, Any]] | None = None,
) -> tuple[CIRRanking, int, float]:
    """Rerank the top ``topk`` of every global CIR ranking; the rest of each ranking keeps its order.

    The reranker sees the composed queries as query features and the target-image features as the gallery
    (both L2-normalised, as the transductive methods expect); ``query_images``/``gallery_images`` (``(path,
    None)`` per query reference / gallery image) are for ``geometric``, which verifies the *reference* image
    against each candidate. ``topk`` is capped at the shortest ranking (a gallery smaller than ``topk``).

    Returns:
        The reranked :class:`CIRRanking` (same queries and gallery), the number of head results reranked, and
        the seconds the reranker took (feature lookups excluded, as in DeepFashion2 evaluation).
    """
    if topk < 1:
        raise ConfigError(f"--rerank-topk must be >= 1, got {topk}")
    num_q = len(result.names)
    k_r = min([int(topk), *(len(row) for row in result.names)])
    if num_q == 0 or k_r == 0:
        return result, k_r, 0.0
    index = {name: i for i, name in enumerate(result.gallery.names)}
    head = torch.tensor([[index[name] for name in row[:k_r]] for row in result.names], dtype=torch.int64)
    gallery = result.gallery.features.float()
    queries = result.queries.float()
    scores = torch.einsum("qd,qkd->qk", queries, gallery[head])
    reranked, _, seconds = rerank_head(
        reranker,
        RerankInputs(
            ranking=head,
            scores=scores,
            query_features=queries,
            gallery_features=gallery,
            query_images=list(query_images) if query_images is not None else None,
            gallery_images=list(gallery_images) if gallery_images is not None else None,
        ),
    )
    names = result.gallery.names
    reordered = [
        [names[i] for i in row] + list(old[k_r:]) for row, old in zip(reranked.tolist(), result.names)
    ]
    return CIRRanking(names=reordered, queries=result.queries, gallery=result.gallery), k_r, seconds


def image_refs(dataset: Any, names: Sequence[str]) -> list[tuple[str, None]]:
    """``(image path, None)`` per image name of a CIR dataset: whole images, for geometric verification."""
    return [(str(dataset.image_path(name)), None) for name in names]


def cirr_with_members(result: CIRRanking, *, dataset: Any) -> dict[int, list[str]]:
    """pairid -> the ranking of ``result`` followed by the query's remaining ``img_set`` members.

    The members not already listed are appended in descending similarity to the composed query, so the list
    is a prefix of the full ranking *restricted* to what Recall_subset needs: both ``cirr_metrics`` and the
    ``recall_subset`` submission writer can read it without ranking the whole gallery per query. After
    reranking, the listed members keep the reranked order and the appended ones follow in score order.
    """
    out: dict[int, list[str]] = {}
    for i, (t, ranking) in enumerate(zip(dataset.triplets, result.names)):
        listed = set(ranking)
        rest = [m for m in dict.fromkeys(t.members) if m != t.reference and m not in listed]
        if rest:
            scores = result.gallery.lookup(rest) @ result.queries[i]
            order = torch.sort(scores, descending=True, stable=True).indices.tolist()
            ranking = ranking + [rest[j] for j in order]
        out[t.query_id] = ranking
    return out


def circo_ids(result: CIRRanking, *, dataset: Any) -> dict[int, list[int]]:
    """query id -> ranked COCO ids, what ``circo_metrics`` and the submission writer take."""
    return {q.query_id: [int(n) for n in ranking] for q, ranking in zip(dataset.queries, result.names)}
