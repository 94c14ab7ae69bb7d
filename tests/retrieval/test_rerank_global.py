"""Global rerankers (αQE/DBA, SuperGlobal, k-reciprocal): small examples with a known answer, and the fast
implementations against dense, loop-based transcriptions of the original algorithms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capret.retrieval.rerank import (
    AlphaQueryExpansion,
    KReciprocalRerank,
    SuperGlobalRerank,
    create_reranker,
    list_rerankers,
)


def _normed(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(rng: np.random.Generator, *, n_clusters: int, per: int, dim: int, noise: float) -> np.ndarray:
    centres = rng.standard_normal((n_clusters, dim))
    return _normed(np.repeat(centres, per, 0) + noise * rng.standard_normal((n_clusters * per, dim)))


def _full_ranking(q: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims = q @ g.T
    order = np.argsort(-sims, axis=1, kind="stable")
    return order, np.take_along_axis(sims, order, 1)


# ---------------------------------------------------------------- dense references (straight from the papers)


def dense_aqe(q: np.ndarray, g: np.ndarray, *, k: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """fast-reid's aqe, one round, written as a per-row loop over the full (Q+G)^2 similarity matrix."""
    feats = np.concatenate([q, g]).astype(np.float64)
    normed = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sims = normed @ normed.T
    new = np.zeros_like(feats)
    for i in range(feats.shape[0]):
        top = np.argsort(-sims[i], kind="stable")[:k]
        weights = sims[i, top] ** alpha
        new[i] = (feats[top] * weights[:, None]).mean(0)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    return new[: q.shape[0]], new[q.shape[0] :]


def dense_superglobal(q: np.ndarray, g: np.ndarray, ranking: np.ndarray, *, m: int, k: int, beta: float):
    """MDescAug + RerankwMDA for one query at a time, with explicit loops."""
    out = []
    for qi in range(q.shape[0]):
        cand = ranking[qi, :m]
        x = g[cand].astype(np.float64)
        sims = x @ x.T
        aug = np.zeros_like(x)
        for i in range(m):
            neigh = np.argsort(-sims[i], kind="stable")[: k + 1]
            w = np.array([1.0] + [beta * sims[i, j] for j in neigh[1:]])
            aug[i] = (w[:, None] * x[neigh]).sum(0) / w.sum()
        s = aug @ q[qi]
        best = np.argsort(-s, kind="stable")[: k + 1]
        pooled = aug[best].max(0)
        final = (s + aug @ pooled) / 2
        out.append(cand[np.argsort(-final, kind="stable")])
    return np.stack(out)


def dense_kreciprocal(q: np.ndarray, g: np.ndarray, *, k1: int, k2: int, lambda_value: float) -> np.ndarray:
    """Zhong et al.'s re_ranking with dense (Nq+Ng)^2 matrices, transcribed step by step; returns [Q, G]."""
    nq = q.shape[0]
    feats = np.concatenate([q, g]).astype(np.float32)
    n = feats.shape[0]
    original = np.clip(2.0 - 2.0 * (feats @ feats.T), 0, None)
    original = np.transpose(original / np.max(original, axis=0))
    v = np.zeros((n, n), dtype=np.float64)
    initial_rank = np.argsort(original, axis=1, kind="stable")
    for i in range(n):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        k_rec = forward[np.where(backward == i)[0]]
        expansion = k_rec
        for cand in k_rec:
            half = int(np.around(k1 / 2))
            c_forward = initial_rank[cand, : half + 1]
            c_backward = initial_rank[c_forward, : half + 1]
            c_rec = c_forward[np.where(c_backward == cand)[0]]
            if len(np.intersect1d(c_rec, k_rec)) > 2 / 3 * len(c_rec):
                expansion = np.append(expansion, c_rec)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        v[i, expansion] = weight / np.sum(weight)
    if k2 != 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i] = np.mean(v[initial_rank[i, :k2], :], axis=0)
        v = v_qe
    jaccard = np.zeros((nq, n))
    for i in range(nq):
        temp_min = np.zeros(n)
        for c in np.where(v[i] != 0)[0]:
            rows = np.where(v[:, c] != 0)[0]
            temp_min[rows] += np.minimum(v[i, c], v[rows, c])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    final = jaccard * (1 - lambda_value) + original[:nq] * lambda_value
    return final[:, nq:]


# ---------------------------------------------------------------- tests


def test_registry_lists_all_and_rejects_unknown() -> None:
    assert {"aqe", "geometric", "kreciprocal", "superglobal"} <= set(list_rerankers())
    with pytest.raises(KeyError, match="valid names"):
        create_reranker("nope")


@pytest.mark.parametrize("name", ["aqe", "superglobal", "kreciprocal"])
def test_output_is_a_permutation_of_each_row(name: str) -> None:
    rng = np.random.default_rng(1)
    g = _clustered(rng, n_clusters=8, per=6, dim=16, noise=0.5)
    q = _clustered(rng, n_clusters=8, per=2, dim=16, noise=0.5)
    ranking, scores = _full_ranking(q, g)
    ranking, scores = ranking[:, :20], scores[:, :20]
    new_rank, new_scores = create_reranker(name).rerank(
        ranking=ranking, scores=scores, query_features=q, gallery_features=g
    )
    assert new_rank.shape == ranking.shape and new_rank.dtype == np.int64 and new_scores.dtype == np.float32
    assert (np.sort(new_rank, 1) == np.sort(ranking, 1)).all()
    assert (np.diff(new_scores, axis=1) <= 1e-6).all()
    # torch inputs give the same answer as numpy inputs
    t_rank, _ = create_reranker(name).rerank(
        ranking=torch.from_numpy(ranking),
        scores=torch.from_numpy(scores),
        query_features=torch.from_numpy(q),
        gallery_features=torch.from_numpy(g),
    )
    assert (t_rank == new_rank).all()


def test_bad_ranking_is_rejected_with_the_value() -> None:
    q = _normed(np.ones((1, 4)))
    g = _normed(np.eye(4))
    with pytest.raises(ValueError, match="-1"):
        create_reranker("aqe").rerank(
            ranking=np.array([[0, -1]]), scores=np.zeros((1, 2)), query_features=q, gallery_features=g
        )


def _two_cluster_example() -> tuple[np.ndarray, np.ndarray]:
    """The query's near-duplicate ``a`` (0) and three views ``b`` (1-3) of the same object that sit close to
    ``a`` but farther from the query, against a distractor ``d`` (4) that the query scores above the ``b``
    views but whose own neighbours (5-7) are a different object. Expansion through neighbours must demote d."""
    q = _normed(np.array([[1.0, 0.0, 0.0]]))
    g = _normed(
        np.array(
            [
                [0.95, 0.31, 0.02],
                [0.6, 0.8, 0.0],
                [0.58, 0.8, 0.05],
                [0.62, 0.78, -0.04],
                [0.75, 0.0, 0.66],
                [0.4, 0.02, 0.92],
                [0.38, -0.03, 0.93],
                [0.42, 0.0, 0.9],
            ]
        )
    )
    return q, g


@pytest.mark.parametrize("name", ["aqe", "superglobal", "kreciprocal"])
def test_known_order_neighbours_demote_the_distractor(name: str) -> None:
    q, g = _two_cluster_example()
    ranking, scores = _full_ranking(q, g)
    assert list(ranking[0]) == [0, 4, 3, 1, 2, 7, 5, 6]  # globally the distractor is second
    options = {"aqe": {"k": 4}, "superglobal": {"k": 3}, "kreciprocal": {}}[name]
    new_rank, _ = create_reranker(name, **options).rerank(
        ranking=ranking, scores=scores, query_features=q, gallery_features=g
    )
    row = list(new_rank[0])
    assert row[0] == 0
    assert sorted(row[1:4]) == [1, 2, 3], f"{name}: the three views should follow a, got {row}"
    assert sorted(row[4:]) == [4, 5, 6, 7]


def test_aqe_matches_dense_reference() -> None:
    rng = np.random.default_rng(2)
    g = _clustered(rng, n_clusters=10, per=5, dim=12, noise=0.6)
    q = _clustered(rng, n_clusters=10, per=1, dim=12, noise=0.6)
    ranking, scores = _full_ranking(q, g)
    rq, rg = dense_aqe(q, g, k=10, alpha=3.0)
    fast_q, fast_g = AlphaQueryExpansion(k=10, alpha=3.0).expand(torch.from_numpy(q), torch.from_numpy(g))
    np.testing.assert_allclose(fast_q.numpy(), rq, atol=1e-5)
    np.testing.assert_allclose(fast_g.numpy(), rg, atol=1e-5)
    expected = np.argsort(-(rq @ rg.T), axis=1, kind="stable")
    new_rank, _ = AlphaQueryExpansion(k=10, alpha=3.0).rerank(
        ranking=ranking, scores=scores, query_features=q, gallery_features=g
    )
    assert (new_rank == expected).all()


@pytest.mark.parametrize("topk", [30, 50])
def test_superglobal_matches_dense_reference(topk: int) -> None:
    rng = np.random.default_rng(3)
    g = _clustered(rng, n_clusters=10, per=5, dim=12, noise=0.7)
    q = _clustered(rng, n_clusters=10, per=1, dim=12, noise=0.7)
    ranking, scores = _full_ranking(q, g)
    ranking, scores = ranking[:, :topk], scores[:, :topk]
    m = 25
    expected = dense_superglobal(q, g, ranking, m=m, k=9, beta=0.15)
    new_rank, new_scores = SuperGlobalRerank(m=m, k=9, beta=0.15, chunk=3).rerank(
        ranking=ranking, scores=scores, query_features=q, gallery_features=g
    )
    assert (new_rank[:, :m] == expected).all()
    assert (new_rank[:, m:] == ranking[:, m:]).all()  # the tail beyond M keeps its order
    assert (np.diff(new_scores, axis=1) <= 1e-6).all()


@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (6, 3, 0.5), (5, 1, 0.1)])
def test_kreciprocal_matches_dense_reference(k1: int, k2: int, lam: float) -> None:
    rng = np.random.default_rng(4)
    g = _clustered(rng, n_clusters=9, per=6, dim=10, noise=0.8)
    q = _clustered(rng, n_clusters=9, per=2, dim=10, noise=0.8)
    ranking, scores = _full_ranking(q, g)
    dense = dense_kreciprocal(q, g, k1=k1, k2=k2, lambda_value=lam)
    expected = np.argsort(dense, axis=1, kind="stable")
    reranker = KReciprocalRerank(k1=k1, k2=k2, lambda_value=lam, chunk=7)
    fast = reranker.distances(torch.from_numpy(q), torch.from_numpy(g), torch.from_numpy(ranking)).numpy()
    np.testing.assert_allclose(fast, np.take_along_axis(dense, ranking, 1), atol=1e-5)
    new_rank, _ = reranker.rerank(ranking=ranking, scores=scores, query_features=q, gallery_features=g)
    assert (new_rank == expected).all()


def test_kreciprocal_on_a_truncated_ranking_orders_the_same_items_as_the_dense_one() -> None:
    rng = np.random.default_rng(5)
    g = _clustered(rng, n_clusters=6, per=5, dim=8, noise=0.8)
    q = _clustered(rng, n_clusters=6, per=1, dim=8, noise=0.8)
    ranking, scores = _full_ranking(q, g)
    dense = dense_kreciprocal(q, g, k1=20, k2=6, lambda_value=0.3)
    top = ranking[:, :10]
    new_rank, _ = create_reranker("kreciprocal").rerank(
        ranking=top, scores=scores[:, :10], query_features=q, gallery_features=g
    )
    expected = np.take_along_axis(top, np.argsort(np.take_along_axis(dense, top, 1), 1, kind="stable"), 1)
    assert (new_rank == expected).all()
