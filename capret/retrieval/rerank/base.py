"""Rerankers of a global top-K ranking: one registry, one call signature.

Every reranker has ``rerank(*, ranking, scores, query_features, gallery_features, query_images=None,
gallery_images=None) -> (ranking, scores)``: ``ranking`` is ``[Q, K]`` gallery positions (best first) from a
global search, ``scores`` its ``[Q, K]`` similarities, features are the L2-normalised global descriptors of
*all* queries and *all* gallery items (the transductive methods use them), and an image reference is
``(path, bbox_xyxy | None)`` (used by ``geometric`` only). The result is the same ``[Q, K]`` items reordered,
as numpy ``(int64 ranking, float32 scores)`` with scores non-increasing along each row.

This module holds the protocol, the registry and the shared input checks (:func:`prepare_inputs`, and
:func:`require_image_refs` for rerankers that look at pixels); the rerankers live in
:mod:`.global_` (``aqe``, ``superglobal``, ``kreciprocal``) and :mod:`.geometric` (SIFT + RANSAC).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NotRequired, Protocol, TypedDict, Unpack

import numpy as np
import torch

from capret.errors import ConfigError, require_finite
from capret.io import default_device
from capret.registry import Registry

__all__ = [
    "FeatureReranker",
    "ImageRef",
    "append_tail",
    "candidate_scores",
    "Reranker",
    "RerankInputs",
    "RerankRequest",
    "create_reranker",
    "list_rerankers",
    "prepare_inputs",
    "register_reranker",
    "require_image_refs",
    "sort_rows",
]

#: ``(image path, [x1, y1, x2, y2] box in pixels or None for the whole image)``.
ImageRef = tuple[str, Any]


class RerankRequest(TypedDict):
    """The keywords of every reranker's ``rerank`` (the module docstring says what each holds), stated once for
    the protocol and the shared implementation; :func:`prepare_inputs` checks them."""

    ranking: Any
    scores: Any
    query_features: Any
    gallery_features: Any
    query_images: NotRequired[list[ImageRef] | None]
    gallery_images: NotRequired[list[ImageRef] | None]


class Reranker(Protocol):
    def rerank(self, **request: Unpack[RerankRequest]) -> tuple[np.ndarray, np.ndarray]: ...


#: the built-in rerankers register themselves when their module is imported (on first use)
_RERANKERS: Registry[Reranker] = Registry(
    "reranker",
    lazy_modules={
        **dict.fromkeys(("aqe", "superglobal", "kreciprocal"), "capret.retrieval.rerank.global_"),
        "geometric": "capret.retrieval.rerank.geometric",
    },
)


def register_reranker(name: str) -> Any:
    """Decorator registering a reranker factory (``factory(**options) -> Reranker``) under ``name``."""
    return _RERANKERS.register(name)


def create_reranker(name: str, **options: Any) -> Reranker:
    """Build reranker ``name`` with its keyword options; unknown names list the valid ones."""
    return _RERANKERS.create(name, **options)


def list_rerankers() -> list[str]:
    return _RERANKERS.names()


def _to_tensor(value: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype, device=device)


class RerankInputs:
    """Validated reranker inputs as torch tensors on one device."""

    def __init__(
        self,
        *,
        ranking: torch.Tensor,
        scores: torch.Tensor,
        query_features: torch.Tensor,
        gallery_features: torch.Tensor,
        query_images: list[ImageRef] | None = None,
        gallery_images: list[ImageRef] | None = None,
    ) -> None:
        self.ranking = ranking
        self.scores = scores
        self.query_features = query_features
        self.gallery_features = gallery_features
        self.query_images = query_images  # (path, box) per query row, for rerankers that look at pixels
        self.gallery_images = gallery_images  # (path, box) per gallery item

    @property
    def num_queries(self) -> int:
        return int(self.ranking.shape[0])

    @property
    def topk(self) -> int:
        return int(self.ranking.shape[1])


def prepare_inputs(
    *,
    ranking: Any,
    scores: Any,
    query_features: Any,
    gallery_features: Any,
    query_images: list[ImageRef] | None = None,
    gallery_images: list[ImageRef] | None = None,
    device: torch.device | str | None = None,
) -> RerankInputs:
    """Convert and check shapes: ranking ``[Q, K]`` positions in ``[0, G)``, scores ``[Q, K]``, ``[Q|G, D]``; the
    image references ride along (checked by :func:`require_image_refs` where a reranker needs them)."""
    dev = default_device(device)
    rank_t = _to_tensor(ranking, dtype=torch.int64, device=dev)
    score_t = _to_tensor(scores, dtype=torch.float32, device=dev)
    q = _to_tensor(query_features, dtype=torch.float32, device=dev)
    g = _to_tensor(gallery_features, dtype=torch.float32, device=dev)
    if rank_t.ndim != 2:
        raise ValueError(f"ranking must be [Q, K] gallery positions, got shape {list(rank_t.shape)}")
    if score_t.shape != rank_t.shape:
        raise ValueError(
            f"scores shape {list(score_t.shape)} differs from ranking shape {list(rank_t.shape)}"
        )
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(
            f"query_features {list(q.shape)} and gallery_features {list(g.shape)} must be [Q, D] and [G, D]"
        )
    require_finite(score_t, what="reranker scores")
    require_finite(q, what="reranker query_features")
    require_finite(g, what="reranker gallery_features")
    if q.shape[0] != rank_t.shape[0]:
        raise ValueError(f"{q.shape[0]} query features for {rank_t.shape[0]} ranking rows")
    if rank_t.numel() and (int(rank_t.min()) < 0 or int(rank_t.max()) >= g.shape[0]):
        bad = int(rank_t.min()) if int(rank_t.min()) < 0 else int(rank_t.max())
        raise ValueError(
            f"ranking holds gallery position {bad}, outside [0, {g.shape[0]}); search with k <= gallery size "
            "so no -1 padding reaches the reranker"
        )
    return RerankInputs(
        ranking=rank_t,
        scores=score_t,
        query_features=q,
        gallery_features=g,
        query_images=query_images,
        gallery_images=gallery_images,
    )


def require_image_refs(inp: RerankInputs, *, method: str) -> tuple[list[ImageRef], list[ImageRef]]:
    """The image references of a reranker that looks at pixels: present, one per query row and per gallery item."""
    query_images, gallery_images = inp.query_images, inp.gallery_images
    if query_images is None or gallery_images is None:
        raise ConfigError(f"{method} reranking needs query_images and gallery_images: (path, bbox) per item")
    if len(query_images) != inp.num_queries or len(gallery_images) != inp.gallery_features.shape[0]:
        raise ConfigError(
            f"got {len(query_images)} query / {len(gallery_images)} gallery image refs for "
            f"{inp.num_queries} queries / {inp.gallery_features.shape[0]} gallery items"
        )
    return list(query_images), list(gallery_images)


def sort_rows(ranking: torch.Tensor, new_scores: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Reorder each row by ``new_scores`` (descending; ties keep the incoming order) and return numpy arrays."""
    order = torch.sort(new_scores, dim=1, descending=True, stable=True).indices
    out_rank = ranking.gather(1, order)
    out_scores = new_scores.gather(1, order)
    return out_rank.cpu().numpy().astype(np.int64), out_scores.float().cpu().numpy()


def append_tail(
    head_ranking: torch.Tensor,
    head_scores: torch.Tensor,
    tail_ranking: torch.Tensor,
    tail_scores: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Join a reranked head with the untouched tail, shifting tail scores so rows stay non-increasing."""
    if tail_ranking.shape[1] == 0:
        return head_ranking, head_scores
    head_min = head_scores.min(dim=1, keepdim=True).values
    shift = (tail_scores[:, :1] - head_min).clamp(min=0)
    return torch.cat([head_ranking, tail_ranking], 1), torch.cat([head_scores, tail_scores - shift], 1)


#: Gathering a candidate's descriptor costs about as much as this many multiply-adds of a dense product on a CPU
#: (measured with scripts/bench/rerank.py): below it, scoring the whole gallery and picking the candidates wins.
DENSE_OVER_GATHER = 80


def candidate_scores(
    queries: torch.Tensor, gallery: torch.Tensor, ranking: torch.Tensor, *, chunk: int = 32
) -> torch.Tensor:
    """``[Q, K]`` inner products of each query with its ranked candidates, chunked over queries.

    When the gallery is small next to the candidate lists (``G < DENSE_OVER_GATHER * K``) a chunk's whole row of
    scores is one matrix product and the candidates are picked from it; otherwise their descriptors are gathered
    with ``index_select`` a few queries at a time (the gathered block stays in cache for the batched product; one
    large gather or advanced indexing costs 2-3x more).
    """
    out = torch.empty(ranking.shape, dtype=torch.float32, device=ranking.device)
    width = max(ranking.shape[1], 1)
    dense = gallery.shape[0] < DENSE_OVER_GATHER * width
    step = max(chunk, (1 << 14) // width) if dense else chunk
    for s in range(0, ranking.shape[0], step):
        rows = ranking[s : s + step]
        if dense:
            out[s : s + step] = (queries[s : s + step] @ gallery.T).gather(1, rows)
        else:
            cand = gallery.index_select(0, rows.reshape(-1)).view(rows.shape[0], rows.shape[1], -1)
            out[s : s + step] = torch.bmm(cand, queries[s : s + step, :, None]).squeeze(2)
    return out


@dataclass(kw_only=True)
class FeatureReranker:
    """Shared entry point of every built-in reranker (``aqe``, ``superglobal``, ``kreciprocal``, ``geometric``):
    :meth:`rerank` validates and converts the inputs once (on :attr:`device`), then :meth:`reorder` does the
    method's own work on the checked tensors. Image references ride on the inputs; the global-feature rerankers
    ignore them, a reranker that looks at pixels checks them with :func:`require_image_refs`. The global
    rerankers are keyword-only dataclasses below it: their settings are fields, ``device`` is this one.
    """

    device: str | None = None

    def rerank(self, **request: Unpack[RerankRequest]) -> tuple[np.ndarray, np.ndarray]:
        return self.reorder(prepare_inputs(**request, device=self.device))

    def reorder(self, inp: RerankInputs) -> tuple[np.ndarray, np.ndarray]:
        """The reordered ``(ranking, scores)`` as numpy arrays of the input's shape."""
        raise NotImplementedError
