"""Retrieval metrics as pure, vectorised, chunked functions of scores (or rankings) and relevance.

Two entry styles share one core:

* **score matrices** ``scores [Q, G]`` (higher is better) with ``relevance [Q, G]`` bool: the full gallery is
  ranked per chunk of queries, so memory stays ``O(chunk_size * G)`` however many queries there are;
* **rankings** ``ranking [Q, K]`` (gallery indices, best first, possibly truncated to ``K < G``) with the same
  ``relevance [Q, G]``: the ``*_from_ranking`` functions. A truncated ranking still needs the total number of
  relevant items of each query for AP and MAP@R; it defaults to ``relevance.sum(1)`` and can be given as
  ``num_relevant`` when ``relevance`` itself only covers part of the gallery.

Both reduce a ranking to a boolean ``hits [Q, K]`` matrix (``hits[q, i]`` = the i-th ranked item is relevant)
and the ``*_from_hits`` functions compute per-query values from it; callers that build hits themselves (e.g.
from identity labels, chunk by chunk) use those directly.

**Tie rule.** Items with equal scores are ranked by gallery index, lower first (a stable sort of ``-score``).
The rule is deterministic and independent of the device and of the chunk size, so a metric never depends on
how the work was split.

**Queries with no relevant item** have no defined AP, recall or MAP@R (the denominator is zero). They are
excluded from every mean: the per-query functions return NaN for them, and the mean functions emit one
``RuntimeWarning`` giving the count. (PyTorch Metric Learning drops such "lone" queries in the same way.)

References: non-interpolated AP, ``AP = (1/|rel|) * sum_k P@k * rel_k`` (TREC; Philbin et al. 2007 use the
interpolated variant, we do not); MAP@R from Musgrave et al., "A Metric Learning Reality Check", ECCV 2020:
``MAP@R = (1/R) * sum_{i<=R} P@i * rel_i`` with ``R`` = number of relevant items of the query; recall@k as the
DeepFashion2 "top-k accuracy" (a hit if any relevant item is among the first k).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from capret.errors import ConfigError, require_finite

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "rank",
    "ranked_hits",
    "ap_from_hits",
    "map_at_r_from_hits",
    "hit_at_k_from_hits",
    "precision_at_k_from_hits",
    "average_precision",
    "mean_average_precision",
    "recall_at_k",
    "precision_at_k",
    "map_at_r",
    "average_precision_from_ranking",
    "mean_average_precision_from_ranking",
    "recall_at_k_from_ranking",
    "precision_at_k_from_ranking",
    "map_at_r_from_ranking",
    "nanmean_with_warning",
]

#: Queries ranked at once; ``chunk_size * G`` scores (and their sort) are in memory at a time.
DEFAULT_CHUNK_SIZE = 512

ArrayLike = np.ndarray | torch.Tensor


def _as_tensor(x: ArrayLike, *, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    t = t.detach().cpu()
    require_finite(t, what=name)  # NaN scores sort anywhere and would still give a plausible metric
    return t.to(dtype) if dtype is not None else t


def _check_matrix_pair(scores: torch.Tensor, relevance: torch.Tensor, *, first: str) -> None:
    if scores.ndim != 2:
        raise ValueError(f"{first} must be a [Q, G] matrix, got shape {tuple(scores.shape)}")
    if relevance.ndim != 2 or relevance.shape[0] != scores.shape[0]:
        raise ValueError(
            f"relevance must be [Q, G] with Q={scores.shape[0]} rows matching {first}, "
            f"got shape {tuple(relevance.shape)}"
        )


def _check_ks(ks: Iterable[int]) -> list[int]:
    out = [int(k) for k in ks]
    if not out or any(k < 1 for k in out):
        raise ConfigError(f"ks must be positive integers, got {list(ks)}")
    return out


def rank(scores: ArrayLike, *, k: int | None = None) -> torch.Tensor:
    """Gallery indices of each row sorted by decreasing score, ties by increasing gallery index.

    Args:
        scores: ``[Q, G]`` similarities, higher is better.
        k: keep only the first ``k`` columns (the full ranking when None).

    Returns:
        ``[Q, min(k, G)]`` int64 tensor.
    """
    s = _as_tensor(scores, name="scores")
    order = torch.sort(-s.to(torch.float64), dim=1, stable=True).indices
    return order if k is None else order[:, :k]


def ranked_hits(ranking: ArrayLike, relevance: ArrayLike) -> torch.Tensor:
    """``hits[q, i] = relevance[q, ranking[q, i]]``: which ranked entries are relevant."""
    r = _as_tensor(ranking, name="ranking", dtype=torch.int64)
    rel = _as_tensor(relevance, name="relevance", dtype=torch.bool)
    _check_matrix_pair(r, rel, first="ranking")
    if r.numel() and (int(r.min()) < 0 or int(r.max()) >= rel.shape[1]):
        raise ValueError(
            f"ranking holds gallery indices outside [0, {rel.shape[1]}): min {int(r.min())}, max {int(r.max())}"
        )
    return torch.gather(rel, 1, r)


def _num_relevant(num_relevant: ArrayLike | None, hits: torch.Tensor) -> torch.Tensor:
    if num_relevant is None:
        return hits.sum(1).to(torch.float64)
    n = _as_tensor(num_relevant, name="num_relevant", dtype=torch.float64).reshape(-1)
    if n.shape[0] != hits.shape[0]:
        raise ValueError(f"num_relevant has {n.shape[0]} entries for {hits.shape[0]} queries")
    found = hits.sum(1).to(torch.float64)
    if bool((found > n).any()):
        q = int(torch.nonzero(found > n)[0, 0])
        raise ValueError(
            f"num_relevant[{q}] = {int(n[q])} but the ranking already holds {int(found[q])} relevant items"
        )
    return n


def _precision_curve(hits: torch.Tensor) -> torch.Tensor:
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)
    return hits.to(torch.float64).cumsum(1) / ranks


def ap_from_hits(hits: ArrayLike, num_relevant: ArrayLike | None = None) -> np.ndarray:
    """Per-query non-interpolated AP of ranked hits; NaN where the query has no relevant item.

    With a truncated ranking (``K < G``) relevant items past ``K`` contribute zero precision, so passing the
    true ``num_relevant`` gives the standard truncated AP (a lower bound of the full-ranking AP).
    """
    h = _as_tensor(hits, name="hits", dtype=torch.bool)
    n = _num_relevant(num_relevant, h)
    total = (_precision_curve(h) * h).sum(1)
    ap = torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan")))
    return ap.numpy()


def map_at_r_from_hits(hits: ArrayLike, num_relevant: ArrayLike | None = None) -> np.ndarray:
    """Per-query MAP@R (Musgrave et al. 2020): precision summed over the first R positions, divided by R.

    Positions beyond the given ranking count as misses (exact when ``K >= R``).
    """
    h = _as_tensor(hits, name="hits", dtype=torch.bool)
    n = _num_relevant(num_relevant, h)
    positions = torch.arange(1, h.shape[1] + 1, dtype=torch.float64)
    within_r = positions[None, :] <= n[:, None]
    total = (_precision_curve(h) * (h & within_r)).sum(1)
    out = torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan")))
    return out.numpy()


def hit_at_k_from_hits(
    hits: ArrayLike, ks: Sequence[int], num_relevant: ArrayLike | None = None
) -> dict[int, np.ndarray]:
    """Per-query 1.0/0.0 "any relevant item in the top k" (NaN for queries with no relevant item)."""
    return _per_query_at_k(hits, ks, num_relevant, lambda head, k: head.any(1).to(torch.float64))


def precision_at_k_from_hits(
    hits: ArrayLike, ks: Sequence[int], num_relevant: ArrayLike | None = None
) -> dict[int, np.ndarray]:
    """Per-query fraction of relevant items among the first k (divided by k even if fewer are ranked)."""
    return _per_query_at_k(hits, ks, num_relevant, lambda head, k: head.sum(1).to(torch.float64) / k)


def _per_query_at_k(
    hits: ArrayLike,
    ks: Sequence[int],
    num_relevant: ArrayLike | None,
    measure: Callable[[torch.Tensor, int], torch.Tensor],
) -> dict[int, np.ndarray]:
    """``measure(hits[:, :k], k)`` per query and k, NaN for queries with no relevant item."""
    h = _as_tensor(hits, name="hits", dtype=torch.bool)
    n = _num_relevant(num_relevant, h)
    out = {}
    for k in _check_ks(ks):
        v = measure(h[:, :k], k)
        out[k] = torch.where(n > 0, v, torch.full_like(v, float("nan"))).numpy()
    return out


def nanmean_with_warning(values: np.ndarray, *, metric: str) -> float:
    """Mean over the non-NaN entries; warns once with the number of excluded (NaN) queries."""
    values = np.asarray(values, dtype=np.float64)
    excluded = int(np.isnan(values).sum())
    if excluded:
        warnings.warn(
            f"{metric}: {excluded} of {values.size} queries have no relevant gallery item and are excluded",
            RuntimeWarning,
            stacklevel=3,
        )
    if excluded == values.size:
        return float("nan")
    return float(np.nanmean(values))


def _score_chunks(
    scores: ArrayLike, relevance: ArrayLike, chunk_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(hits [c, G], num_relevant [c])`` for consecutive query chunks of a full score matrix."""
    s = _as_tensor(scores, name="scores")
    rel = _as_tensor(relevance, name="relevance", dtype=torch.bool)
    _check_matrix_pair(s, rel, first="scores")
    if s.shape != rel.shape:
        raise ValueError(f"scores {tuple(s.shape)} and relevance {tuple(rel.shape)} must have the same shape")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, s.shape[0], chunk_size):
        rel_c = rel[start : start + chunk_size]
        order = rank(s[start : start + chunk_size])
        yield torch.gather(rel_c, 1, order), rel_c.sum(1).to(torch.float64)


def average_precision(
    scores: ArrayLike, relevance: ArrayLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> np.ndarray:
    """Per-query AP over the full ranking of each row of ``scores``; NaN for queries with no relevant item."""
    parts = [ap_from_hits(h, n) for h, n in _score_chunks(scores, relevance, chunk_size)]
    return np.concatenate(parts) if parts else np.zeros(0)


def mean_average_precision(
    scores: ArrayLike, relevance: ArrayLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> float:
    """mAP over queries that have at least one relevant item (the others are excluded with a warning)."""
    return nanmean_with_warning(average_precision(scores, relevance, chunk_size=chunk_size), metric="mAP")


def map_at_r(scores: ArrayLike, relevance: ArrayLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Mean MAP@R (Musgrave et al. 2020) over queries with at least one relevant item."""
    parts = [map_at_r_from_hits(h, n) for h, n in _score_chunks(scores, relevance, chunk_size)]
    return nanmean_with_warning(np.concatenate(parts), metric="MAP@R")


def recall_at_k(
    scores: ArrayLike, relevance: ArrayLike, ks: Sequence[int], *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> dict[int, float]:
    """Fraction of queries with a relevant item in the top k (DeepFashion2 top-k accuracy), per k."""
    return _chunked_at_k(hit_at_k_from_hits, scores, relevance, ks, chunk_size=chunk_size, label="R")


def precision_at_k(
    scores: ArrayLike, relevance: ArrayLike, ks: Sequence[int], *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> dict[int, float]:
    """Mean fraction of relevant items among the first k, per k."""
    return _chunked_at_k(precision_at_k_from_hits, scores, relevance, ks, chunk_size=chunk_size, label="P")


def _chunked_at_k(
    per_chunk: Callable[[torch.Tensor, Sequence[int], torch.Tensor], dict[int, np.ndarray]],
    scores: ArrayLike,
    relevance: ArrayLike,
    ks: Sequence[int],
    *,
    chunk_size: int,
    label: str,
) -> dict[int, float]:
    """Mean over queries of a per-k measure computed chunk by chunk (``label@k`` names it in warnings)."""
    ks = _check_ks(ks)
    parts = [per_chunk(h, ks, n) for h, n in _score_chunks(scores, relevance, chunk_size)]
    return {k: nanmean_with_warning(np.concatenate([p[k] for p in parts]), metric=f"{label}@{k}") for k in ks}


def average_precision_from_ranking(
    ranking: ArrayLike, relevance: ArrayLike, *, num_relevant: ArrayLike | None = None
) -> np.ndarray:
    """Per-query AP of a (possibly truncated) ranking; ``num_relevant`` defaults to ``relevance.sum(1)``."""
    rel = _as_tensor(relevance, name="relevance", dtype=torch.bool)
    n = rel.sum(1) if num_relevant is None else num_relevant
    return ap_from_hits(ranked_hits(ranking, rel), n)


def mean_average_precision_from_ranking(
    ranking: ArrayLike, relevance: ArrayLike, *, num_relevant: ArrayLike | None = None
) -> float:
    """mAP of a (possibly truncated) ranking over queries with at least one relevant item."""
    ap = average_precision_from_ranking(ranking, relevance, num_relevant=num_relevant)
    return nanmean_with_warning(ap, metric="mAP")


def map_at_r_from_ranking(
    ranking: ArrayLike, relevance: ArrayLike, *, num_relevant: ArrayLike | None = None
) -> float:
    """Mean MAP@R of a ranking; positions past its end count as misses (exact when ``K >= R``)."""
    rel = _as_tensor(relevance, name="relevance", dtype=torch.bool)
    n = rel.sum(1) if num_relevant is None else num_relevant
    return nanmean_with_warning(map_at_r_from_hits(ranked_hits(ranking, rel), n), metric="MAP@R")


def recall_at_k_from_ranking(
    ranking: ArrayLike, relevance: ArrayLike, ks: Sequence[int], *, num_relevant: ArrayLike | None = None
) -> dict[int, float]:
    """Recall@k (any relevant item in the top k) of a ranking, per k."""
    return _mean_at_k(
        hit_at_k_from_hits, label="R", ranking=ranking, relevance=relevance, ks=ks, num_relevant=num_relevant
    )


def precision_at_k_from_ranking(
    ranking: ArrayLike, relevance: ArrayLike, ks: Sequence[int], *, num_relevant: ArrayLike | None = None
) -> dict[int, float]:
    """Precision@k of a ranking, per k."""
    return _mean_at_k(
        precision_at_k_from_hits,
        label="P",
        ranking=ranking,
        relevance=relevance,
        ks=ks,
        num_relevant=num_relevant,
    )


def _mean_at_k(
    per_query_at_k: Callable[[ArrayLike, Sequence[int], ArrayLike | None], dict[int, np.ndarray]],
    *,
    label: str,
    ranking: ArrayLike,
    relevance: ArrayLike,
    ks: Sequence[int],
    num_relevant: ArrayLike | None,
) -> dict[int, float]:
    """The mean over queries of a per-query @k metric of a ranking (``label``@k names it in warnings)."""
    rel = _as_tensor(relevance, name="relevance", dtype=torch.bool)
    n = rel.sum(1) if num_relevant is None else num_relevant
    per_query = per_query_at_k(ranked_hits(ranking, rel), ks, n)
    return {k: nanmean_with_warning(v, metric=f"{label}@{k}") for k, v in per_query.items()}
