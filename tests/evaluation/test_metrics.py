"""Retrieval metrics against plain Python loops and scikit-learn, including the chunked path."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from capret.evaluation import metrics as M


def _loop_ranking(scores_row: np.ndarray) -> list[int]:
    """Obvious tie rule: sort by (-score, gallery index)."""
    return sorted(range(len(scores_row)), key=lambda g: (-float(scores_row[g]), g))


def _loop_ap(order: list[int], rel_row: np.ndarray, num_relevant: int | None = None) -> float:
    n = int(rel_row.sum()) if num_relevant is None else num_relevant
    if n == 0:
        return math.nan
    found, total = 0, 0.0
    for i, g in enumerate(order, start=1):
        if rel_row[g]:
            found += 1
            total += found / i
    return total / n


def _loop_map_at_r(order: list[int], rel_row: np.ndarray) -> float:
    r = int(rel_row.sum())
    if r == 0:
        return math.nan
    found, total = 0, 0.0
    for i, g in enumerate(order[:r], start=1):
        if rel_row[g]:
            found += 1
            total += found / i
    return total / r


def _random_problem(seed: int, q: int = 37, g: int = 53, ties: bool = False):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=(q, g)).astype(np.float32) if ties else rng.standard_normal((q, g))
    relevance = rng.random((q, g)) < 0.1
    relevance[0] = False  # one query with nothing relevant
    relevance[1, :] = False
    relevance[1, 7] = True  # exactly one relevant
    return scores, relevance


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("chunk_size", [5, 1000])
def test_average_precision_matches_loop(ties: bool, chunk_size: int) -> None:
    scores, rel = _random_problem(0, ties=ties)
    ap = M.average_precision(scores, rel, chunk_size=chunk_size)
    expected = [_loop_ap(_loop_ranking(scores[i]), rel[i]) for i in range(len(scores))]
    np.testing.assert_allclose(ap, expected, rtol=1e-12, equal_nan=True)
    assert math.isnan(ap[0])
    with pytest.warns(RuntimeWarning, match="1 of 37 queries"):
        m = M.mean_average_precision(scores, rel, chunk_size=chunk_size)
    assert m == pytest.approx(np.nanmean(expected), rel=1e-12)


def test_average_precision_matches_sklearn() -> None:
    scores, rel = _random_problem(1)  # continuous scores: no ties
    ap = M.average_precision(scores, rel, chunk_size=4)
    for i in range(len(scores)):
        if rel[i].any():
            assert ap[i] == pytest.approx(average_precision_score(rel[i], scores[i]), rel=1e-10)


def test_tie_rule_is_gallery_index_order() -> None:
    scores = np.array([[1.0, 2.0, 2.0, 0.5, 2.0]])
    assert M.rank(scores).tolist() == [[1, 2, 4, 0, 3]]
    rel = np.array([[False, False, True, False, False]])
    # relevant item 2 ranks second among the three tied items
    assert M.average_precision(scores, rel)[0] == pytest.approx(0.5)


@pytest.mark.parametrize("chunk_size", [3, 1000])
def test_recall_precision_map_at_r_match_loop(chunk_size: int) -> None:
    scores, rel = _random_problem(2, ties=True)
    ks = [1, 3, 10]
    valid = [i for i in range(len(scores)) if rel[i].any()]
    orders = {i: _loop_ranking(scores[i]) for i in valid}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rec = M.recall_at_k(scores, rel, ks, chunk_size=chunk_size)
        prec = M.precision_at_k(scores, rel, ks, chunk_size=chunk_size)
        mapr = M.map_at_r(scores, rel, chunk_size=chunk_size)
    for k in ks:
        assert rec[k] == pytest.approx(np.mean([any(rel[i][g] for g in orders[i][:k]) for i in valid]))
        assert prec[k] == pytest.approx(np.mean([sum(rel[i][g] for g in orders[i][:k]) / k for i in valid]))
    assert mapr == pytest.approx(np.mean([_loop_map_at_r(orders[i], rel[i]) for i in valid]))


def test_map_at_r_agrees_with_pytorch_metric_learning() -> None:
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    rng = np.random.default_rng(3)
    q = rng.standard_normal((40, 8)).astype(np.float32)
    g = rng.standard_normal((60, 8)).astype(np.float32)
    ql = rng.integers(0, 6, 40)
    gl = rng.integers(0, 6, 60)
    ours = M.map_at_r(q @ g.T, ql[:, None] == gl[None, :])
    import torch
    from pytorch_metric_learning.distances import DotProductSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = pml.AccuracyCalculator(
        include=("mean_average_precision_at_r",),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=CustomKNN(DotProductSimilarity(normalize_embeddings=False)),
    )
    res = calc.get_accuracy(
        torch.from_numpy(q), torch.from_numpy(ql), torch.from_numpy(g), torch.from_numpy(gl)
    )
    assert ours == pytest.approx(res["mean_average_precision_at_r"], rel=1e-5)


def test_from_ranking_matches_scores_and_truncation() -> None:
    scores, rel = _random_problem(4, ties=True)
    full = M.rank(scores)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert M.mean_average_precision_from_ranking(full, rel) == pytest.approx(
            M.mean_average_precision(scores, rel)
        )
        assert M.recall_at_k_from_ranking(full[:, :10], rel, [1, 5, 10]) == pytest.approx(
            M.recall_at_k(scores, rel, [1, 5, 10])
        )
        assert M.precision_at_k_from_ranking(full[:, :10], rel, [1, 5]) == pytest.approx(
            M.precision_at_k(scores, rel, [1, 5])
        )
        assert M.map_at_r_from_ranking(full, rel) == pytest.approx(M.map_at_r(scores, rel))
    # truncated AP: relevant items past K contribute nothing, denominator stays the full count
    k = 8
    ap_trunc = M.average_precision_from_ranking(full[:, :k], rel)
    for i in range(len(scores)):
        order = _loop_ranking(scores[i])[:k]
        expected = _loop_ap(order, rel[i], num_relevant=int(rel[i].sum()))
        assert (math.isnan(expected) and math.isnan(ap_trunc[i])) or ap_trunc[i] == pytest.approx(expected)
    # explicit num_relevant when relevance only covers the ranked part
    hits = M.ranked_hits(full[:, :k], rel)
    np.testing.assert_allclose(M.ap_from_hits(hits, rel.sum(1)), ap_trunc, equal_nan=True)


def test_input_errors_name_the_problem() -> None:
    scores, rel = _random_problem(5)
    with pytest.raises(ValueError, match="same shape"):
        M.average_precision(scores[:, :-1], rel)
    with pytest.raises(ValueError, match="outside"):
        M.average_precision_from_ranking(np.full((len(scores), 2), 999), rel)
    with pytest.raises(ValueError, match="ks must be positive"):
        M.recall_at_k(scores, rel, [0])
    with pytest.raises(ValueError, match="num_relevant"):
        M.ap_from_hits(np.ones((2, 3), bool), np.array([1, 1]))


@pytest.mark.parametrize("ties", [False, True])
def test_evaluate_embeddings_matches_full_matrix_metrics(ties: bool) -> None:
    from capret.evaluation.retrieval_eval import evaluate_embeddings

    rng = np.random.default_rng(7)
    q = rng.standard_normal((45, 6))
    g = rng.standard_normal((70, 6))
    if ties:  # integer features: many exactly equal scores, including at the top-k cut
        q, g = np.round(q).clip(-1, 1), np.round(g).clip(-1, 1)
        g[5] = g[3]
    q, g = q.astype(np.float32), g.astype(np.float32)
    ql = rng.integers(0, 9, 45)
    gl = rng.integers(0, 8, 70)  # label 8 has no gallery item -> excluded queries
    rel = ql[:, None] == gl[None, :]
    scores = q @ g.T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = evaluate_embeddings(q, g, ql, gl, ks=(1, 5, 10))
        # chunk smaller than Q exercises the chunked path
        from capret.evaluation.retrieval_eval import retrieve_and_evaluate

        chunked = retrieve_and_evaluate(q, g, ql, gl, ks=(1, 5, 10), chunk_size=4).metrics
        assert out["map"] == pytest.approx(M.mean_average_precision(scores, rel), rel=1e-9)
        assert out["map_at_r"] == pytest.approx(M.map_at_r(scores, rel), rel=1e-9)
        rec = M.recall_at_k(scores, rel, [1, 5, 10])
    for k in (1, 5, 10):
        assert out[f"recall@{k}"] == pytest.approx(rec[k])
    assert out["num_excluded"] == int((~rel.any(1)).sum()) > 0
    assert chunked == out
    assert out["num_queries"] == 45 and out["map_depth"] == "full"


def test_exact_search_tie_rule() -> None:
    from capret.evaluation.retrieval_eval import exact_search

    g = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.0]], dtype=np.float32)
    scores, ids = exact_search(np.array([[1.0, 0.0]], dtype=np.float32), g, k=3)
    assert ids.tolist() == [[0, 2, 3]]
    assert scores.tolist() == [[1.0, 1.0, 0.5]]


def test_rerank_after_metrics_equal_full_ranking_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Head reranked + stored tail contribution == metrics of the whole permuted ranking."""
    import capret.retrieval.rerank as rerank_module
    from capret.evaluation.retrieval_eval import evaluate_embeddings

    class ReverseHead:
        def rerank(
            self, *, ranking, scores, query_features, gallery_features, query_images=None, gallery_images=None
        ):
            return ranking[:, ::-1].copy(), scores[:, ::-1].copy()

    monkeypatch.setattr(rerank_module, "create_reranker", lambda name, **kw: ReverseHead())
    rng = np.random.default_rng(11)
    q = rng.standard_normal((30, 5)).astype(np.float32)
    g = rng.standard_normal((50, 5)).astype(np.float32)
    ql, gl = rng.integers(0, 5, 30), rng.integers(0, 5, 50)
    rel = ql[:, None] == gl[None, :]
    out = evaluate_embeddings(q, g, ql, gl, ks=(1, 5), rerank="reverse", rerank_topk=12)
    full = M.rank(q @ g.T).numpy()
    full[:, :12] = full[:, :12][:, ::-1]
    assert out["after"]["map"] == pytest.approx(M.mean_average_precision_from_ranking(full, rel), rel=1e-9)
    assert out["after"]["map_at_r"] == pytest.approx(M.map_at_r_from_ranking(full, rel), rel=1e-9)
    assert out["after"]["recall@5"] == pytest.approx(M.recall_at_k_from_ranking(full, rel, [5])[5])
    assert out["before"]["map"] == pytest.approx(M.mean_average_precision(q @ g.T, rel), rel=1e-9)
    assert out["rerank_topk"] == 12
