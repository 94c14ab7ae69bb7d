"""Evaluate query/gallery embeddings with identity labels: mAP, MAP@R and R@k, optionally after reranking.

mAP is computed over the **full** gallery ranking, chunk by chunk of queries, so its cost is ``O(Q * G log G)``
time and ``O(chunk * G)`` memory and never a ``[Q, G]`` matrix. Reranking only reorders the top ``K`` of each
ranking; since the number of relevant items seen at position ``K`` does not change under a permutation of the
head, the AP contribution of positions after ``K`` is unchanged too. We therefore keep only the head and the
tail's AP (and MAP@R) contribution per query, and recompute the head after reranking: exact full-gallery mAP
before and after, with ``O(Q * K)`` memory.

With an approximate index (``flat``, ``ivfpq``, ``hnsw`` from :mod:`capret.retrieval.index`) only the top
``depth = max(max(ks), rerank_topk)`` results exist; AP is then the truncated AP at that depth (relevant items
further down count as misses) and the report says so (``map_depth``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import numpy as np
import torch
from tqdm.auto import tqdm

from capret.errors import ConfigError, DataError, require_finite
from capret.evaluation.metrics import (
    ap_from_hits,
    hit_at_k_from_hits,
    map_at_r_from_hits,
    nanmean_with_warning,
    rank,
)
from capret.retrieval.rerank.base import RerankInputs

__all__ = [
    "EvaluationRun",
    "RetrievalOptions",
    "evaluate_embeddings",
    "exact_search",
    "rerank_head",
    "retrieve_and_evaluate",
]

ImageRef = tuple[str, Sequence[float] | None]


def _features(x: Any, *, name: str) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise DataError(f"{name} must be a [N, D] matrix, got shape {tuple(t.shape)}")
    if not torch.is_floating_point(t):
        raise DataError(f"{name} must hold floats, got {t.dtype}")
    if t.shape[0] == 0:
        raise DataError(f"{name} holds no row (shape {tuple(t.shape)}): there is nothing to rank or score")
    require_finite(t, what=name)
    return t.to(torch.float32)


def _labels(x: Any, *, name: str, n: int) -> np.ndarray:
    a = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x).reshape(-1)
    if a.shape[0] != n:
        raise DataError(f"{name} has {a.shape[0]} entries but there are {n} feature rows")
    if not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{name} must be integer identity labels, got dtype {a.dtype}")
    return a.astype(np.int64)


def exact_search(
    query_features: Any, gallery_features: Any, *, k: int, chunk_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product search with the deterministic tie rule of :func:`capret.evaluation.metrics.rank`.

    Returns:
        ``(scores [Q, k] float32, gallery indices [Q, k] int64)``, best first.
    """
    q = _features(query_features, name="query_features")
    g = _features(gallery_features, name="gallery_features")
    if q.shape[1] != g.shape[1]:
        raise DataError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}")
    k = min(int(k), g.shape[0])
    scores, ids = [], []
    for start in range(0, q.shape[0], chunk_size):
        s = q[start : start + chunk_size] @ g.T
        order = rank(s, k=k)
        scores.append(torch.gather(s, 1, order))
        ids.append(order)
    if not ids:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat(scores).numpy(), torch.cat(ids).numpy()


def _stable_topk(s: torch.Tensor, k: int) -> torch.Tensor:
    """First ``k`` columns of :func:`rank` without sorting whole rows (ties at the cut fall back to a sort)."""
    if k >= s.shape[1]:
        return rank(s)
    values, idx = torch.topk(s, k, dim=1)
    idx, order = torch.sort(idx, dim=1)  # gallery index order, then a stable sort by score
    values = torch.gather(values, 1, order)
    resort = torch.sort(-values.to(torch.float64), dim=1, stable=True).indices
    out = torch.gather(idx, 1, resort)
    kth = values.min(1).values
    ambiguous = (s == kth[:, None]).sum(1) != (values == kth[:, None]).sum(1)
    if bool(ambiguous.any()):
        rows = torch.nonzero(ambiguous).flatten()
        out[rows] = rank(s[rows], k=k)
    return out


def _relevant_lists(
    labels: np.ndarray, uniq: np.ndarray, label_start: np.ndarray, by_label: np.ndarray
) -> torch.Tensor:
    """``[c, Rmax]`` gallery indices of each query's relevant items, padded with -1."""
    pos = np.clip(np.searchsorted(uniq, labels), 0, max(len(uniq) - 1, 0))
    found = (uniq[pos] == labels) if len(uniq) else np.zeros(len(labels), bool)
    lo = np.where(found, label_start[pos], 0)
    n = (
        np.where(found, label_start[pos + 1] - label_start[pos], 0)
        if len(uniq)
        else np.zeros(len(labels), int)
    )
    width = max(int(n.max()) if len(n) else 0, 1)
    offsets = np.arange(width)
    valid = offsets[None, :] < n[:, None]
    idx = np.where(valid, by_label[np.where(valid, lo[:, None] + offsets[None, :], 0)], -1)
    return torch.from_numpy(idx.astype(np.int64))


def _relevant_ranks(s: torch.Tensor, rel_idx: torch.Tensor) -> torch.Tensor:
    """1-based rank of every relevant item under the tie rule of :func:`rank`, ``[c, Rmax]`` (inf = padding).

    Counting, for each relevant score, how many gallery scores exceed it costs ``O(R * G)`` per query with
    vectorised comparisons, several times cheaper than sorting the row (``O(G log G)``) for the few relevant
    items a retrieval query has. A row where a relevant score equals another gallery score is ranked with the
    full stable sort instead, so the tie rule stays exact.
    """
    s_np = s.numpy()
    idx = rel_idx.numpy()
    valid = idx >= 0
    sr = np.take_along_axis(s_np, np.maximum(idx, 0), axis=1)
    ranks = np.full(idx.shape, np.inf)
    tied = np.zeros(idx.shape[0], dtype=bool)
    for j in range(idx.shape[1]):
        rows = np.nonzero(valid[:, j])[0]
        if len(rows) == 0:
            continue
        block = s_np[rows]
        greater = np.count_nonzero(block > sr[rows, j, None], axis=1)
        equal = np.count_nonzero(block == sr[rows, j, None], axis=1)
        ranks[rows, j] = greater + 1
        tied[rows] |= equal != 1
    rows = np.nonzero(tied)[0]
    if len(rows):
        full = rank(s[rows]).numpy()
        position = np.empty_like(full)
        np.put_along_axis(position, full, np.arange(1, s.shape[1] + 1)[None, :].repeat(len(rows), 0), axis=1)
        fixed = np.take_along_axis(position, np.maximum(idx[rows], 0), axis=1).astype(np.float64)
        ranks[rows] = np.where(valid[rows], fixed, np.inf)
    return torch.from_numpy(ranks)


def _tail_contributions(
    ranks: torch.Tensor, n_rel: torch.Tensor, head_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of ``P@r * rel_r`` over relevant positions ``r > head_k`` (all, and only those ``<= R``)."""
    r_sorted = torch.sort(ranks, dim=1).values
    i = torch.arange(1, r_sorted.shape[1] + 1, dtype=torch.float64)[None, :]
    terms = torch.where(torch.isfinite(r_sorted), i / r_sorted, torch.zeros_like(r_sorted))
    tail = r_sorted > head_k
    return (terms * tail).sum(1), (terms * (tail & (r_sorted <= n_rel[:, None]))).sum(1)


@dataclass
class EvaluationRun:
    """Metrics plus the final top-``K`` ranking (after reranking when one was applied), for pictures."""

    metrics: dict[str, Any]
    ranking: np.ndarray  # [Q, K] gallery indices, best first
    scores: np.ndarray  # [Q, K]


def _summarise(ap: np.ndarray, mapr: np.ndarray, hit_at: dict[int, np.ndarray], *, depth: str | int) -> dict:
    out: dict[str, Any] = {"map": nanmean_with_warning(ap, metric="mAP")}
    out["map_at_r"] = nanmean_with_warning(mapr, metric="MAP@R")
    for k, v in hit_at.items():
        out[f"recall@{k}"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    out["num_queries"] = int(ap.shape[0])
    out["num_excluded"] = int(np.isnan(ap).sum())
    out["map_depth"] = depth
    return out


def _head_metrics(
    head_hits: torch.Tensor, n_rel: torch.Tensor, tail_ap: torch.Tensor, tail_r: torch.Tensor, ks: list[int]
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Full-ranking AP / MAP@R from the head hits plus the stored tail contributions."""
    nan = torch.full_like(n_rel, float("nan"))
    head_ap = torch.from_numpy(np.nan_to_num(ap_from_hits(head_hits, n_rel))) * n_rel
    head_r = torch.from_numpy(np.nan_to_num(map_at_r_from_hits(head_hits, n_rel))) * n_rel
    ap = torch.where(n_rel > 0, (head_ap + tail_ap) / n_rel.clamp(min=1), nan).numpy()
    mapr = torch.where(n_rel > 0, (head_r + tail_r) / n_rel.clamp(min=1), nan).numpy()
    return ap, mapr, hit_at_k_from_hits(head_hits, ks, n_rel)


class RetrievalOptions(TypedDict, total=False):
    """The keyword options of :func:`retrieve_and_evaluate` and :func:`evaluate_embeddings` (see the latter)."""

    ks: Sequence[int]
    index: str
    rerank: str | None
    rerank_topk: int
    query_images: Sequence[ImageRef] | None
    gallery_images: Sequence[ImageRef] | None
    chunk_size: int


def retrieve_and_evaluate(
    query_features: Any,
    gallery_features: Any,
    query_labels: Any,
    gallery_labels: Any,
    *,
    ks: Sequence[int] = (1, 5, 10, 20),
    index: str = "exact",
    rerank: str | None = None,
    rerank_topk: int = 100,
    query_images: Sequence[ImageRef] | None = None,
    gallery_images: Sequence[ImageRef] | None = None,
    chunk_size: int = 256,
) -> EvaluationRun:
    """Rank, optionally rerank, and score; see :func:`evaluate_embeddings` for the arguments."""
    q = _features(query_features, name="query_features")
    g = _features(gallery_features, name="gallery_features")
    if q.shape[1] != g.shape[1]:
        raise DataError(f"query_features dim {q.shape[1]} != gallery_features dim {g.shape[1]}")
    ql = _labels(query_labels, name="query_labels", n=q.shape[0])
    gl = _labels(gallery_labels, name="gallery_labels", n=g.shape[0])
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"ks must be positive integers, got {list(ks)}")
    num_g = g.shape[0]
    head_k = min(num_g, max(ks[-1], rerank_topk if rerank else 0))
    uniq, counts = np.unique(gl, return_counts=True)
    pos = np.clip(np.searchsorted(uniq, ql), 0, max(len(uniq) - 1, 0))
    n_rel = torch.from_numpy(np.where(uniq[pos] == ql, counts[pos], 0).astype(np.float64))
    if not bool((n_rel > 0).any()):
        # every AP would be undefined: a NaN mAP is not a result (usually query and gallery labels come from
        # different identity numberings)
        raise DataError(
            f"no query has a relevant gallery item: none of the {len(np.unique(ql))} query labels (e.g. {int(ql[0])}) "
            f"appears among the {len(uniq)} gallery labels (e.g. {int(gl[0])}); mAP is undefined -- check that both "
            "label arrays number the same identities"
        )
    gl_t, ql_t = torch.from_numpy(gl), torch.from_numpy(ql)

    heads, head_scores = [], []
    tail_ap = torch.zeros(q.shape[0], dtype=torch.float64)
    tail_r = torch.zeros(q.shape[0], dtype=torch.float64)
    if index == "exact":
        depth: str | int = "full"
        by_label = np.argsort(gl, kind="stable")  # gallery indices grouped by label (CSR with uniq/counts)
        label_start = np.concatenate([[0], np.cumsum(counts)])
        chunks = range(0, q.shape[0], chunk_size)
        for start in tqdm(chunks, desc="ranking", leave=False, disable=len(chunks) < 8):
            s = q[start : start + chunk_size] @ g.T
            order = _stable_topk(s, head_k)
            ranks = _relevant_ranks(
                s, _relevant_lists(ql[start : start + chunk_size], uniq, label_start, by_label)
            )
            t_ap, t_r = _tail_contributions(ranks, n_rel[start : start + chunk_size], head_k)
            tail_ap[start : start + chunk_size] = t_ap
            tail_r[start : start + chunk_size] = t_r
            heads.append(order)
            head_scores.append(torch.gather(s, 1, order))
        ranking = torch.cat(heads) if heads else torch.zeros((0, head_k), dtype=torch.int64)
        scores = torch.cat(head_scores) if head_scores else torch.zeros((0, head_k))
    else:
        from capret.retrieval.index import create_index

        depth = head_k
        idx = create_index(index, g.shape[1])
        idx.add(g.numpy(), np.arange(num_g, dtype=np.int64))
        s_np, i_np = idx.search(q.numpy(), head_k)
        if (i_np < 0).any():
            raise ValueError(f"index {index!r} returned fewer than {head_k} results for some queries")
        ranking, scores = torch.from_numpy(i_np.astype(np.int64)), torch.from_numpy(s_np)

    def metrics_of(rk: torch.Tensor) -> dict[str, Any]:
        hits = gl_t[rk] == ql_t[:, None]
        ap, mapr, hit_at = _head_metrics(hits, n_rel, tail_ap, tail_r, ks)
        return _summarise(ap, mapr, hit_at, depth=depth)

    before = metrics_of(ranking)
    if not rerank:
        return EvaluationRun(metrics=before, ranking=ranking.numpy(), scores=scores.numpy())

    k_r = min(int(rerank_topk), head_k)
    head = RerankInputs(
        ranking=ranking[:, :k_r],
        scores=scores[:, :k_r],
        query_features=q,
        gallery_features=g,
        query_images=list(query_images) if query_images is not None else None,
        gallery_images=list(gallery_images) if gallery_images is not None else None,
    )
    reranked, new_scores, seconds = rerank_head(rerank, head)
    new_rank_t = torch.cat([reranked, ranking[:, k_r:]], dim=1)
    new_scores_t = torch.cat([torch.as_tensor(new_scores, dtype=scores.dtype), scores[:, k_r:]], dim=1)
    metrics = {
        "before": before,
        "after": metrics_of(new_rank_t),
        "rerank": rerank,
        "rerank_topk": k_r,
        "rerank_seconds": seconds,
    }
    return EvaluationRun(metrics=metrics, ranking=new_rank_t.numpy(), scores=new_scores_t.numpy())


def rerank_head(reranker: str, head: RerankInputs) -> tuple[torch.Tensor, np.ndarray, float]:
    """Rerank the head ranking of ``head`` (``[Q, K]`` gallery positions, best first) with reranker ``reranker``.

    One place for what every caller of a reranker must do around it (the DeepFashion2 evaluation here and the
    composed-retrieval search): time the reranker alone (feature lookups are the caller's and excluded, so the
    reported seconds compare across protocols), and refuse a result that is not a permutation of each row's head
    (a reranker may only reorder; anything else would silently change the recall it is scored on).

    Returns:
        The reordered head (int64 ``[Q, K]``), its scores as the reranker returned them, and the seconds taken.
    """
    from capret.retrieval.rerank import create_reranker

    model = create_reranker(reranker)
    start = time.perf_counter()
    new_rank, new_scores = model.rerank(
        ranking=head.ranking.numpy(),
        scores=head.scores.numpy(),
        query_features=head.query_features.numpy(),
        gallery_features=head.gallery_features.numpy(),
        query_images=head.query_images,
        gallery_images=head.gallery_images,
    )
    seconds = time.perf_counter() - start
    reranked = torch.as_tensor(np.asarray(new_rank), dtype=torch.int64)
    if reranked.shape != head.ranking.shape or not torch.equal(
        reranked.sort(1).values, head.ranking.sort(1).values
    ):
        raise ValueError(f"reranker {reranker!r} must return a permutation of each row's top {head.topk}")
    return reranked, np.asarray(new_scores), seconds


def evaluate_embeddings(
    query_features: Any,
    gallery_features: Any,
    query_labels: Any,
    gallery_labels: Any,
    **options: Unpack[RetrievalOptions],
) -> dict[str, Any]:
    """mAP (full gallery), MAP@R and recall@k of embeddings whose labels define relevance (equal = relevant).

    Args:
        query_features: ``[Q, D]`` L2-normalised embeddings (inner product is the similarity).
        gallery_features: ``[G, D]``.
        query_labels: ``[Q]`` integer identities; a query with no gallery item of its label is excluded.
        gallery_labels: ``[G]``.
        ks: recall cut-offs.
        index: ``exact`` (chunked torch, full ranking) or a :mod:`capret.retrieval.index` backend name.
        rerank: a :mod:`capret.retrieval.rerank` name; reorders the top ``rerank_topk`` of every ranking.
        rerank_topk: how many head results the reranker sees.
        query_images: ``(path, bbox_xyxy | None)`` per query, for rerankers that look at pixels.
        gallery_images: same for the gallery.
        chunk_size: queries scored at a time by the exact ranking.

    Returns:
        ``{"map", "map_at_r", "recall@k"..., "num_queries", "num_excluded", "map_depth"}``; with ``rerank``,
        ``{"before": {...}, "after": {...}, "rerank", "rerank_topk", "rerank_seconds"}``.
    """
    return retrieve_and_evaluate(
        query_features, gallery_features, query_labels, gallery_labels, **options
    ).metrics
