"""``self_knn`` (symmetric tiles, threshold-gathered candidates, int64 keys) against the obvious reference: the
full similarity matrix and a stable descending sort of each row."""

from __future__ import annotations

import pytest
import torch

from capret.retrieval import knn
from capret.retrieval.knn import self_knn


def _reference(feats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rerankers' first implementation: every row sorted in full, ties towards the lower position."""
    full = feats @ feats.T
    order = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :k]
    return full.gather(1, order), order, full.min(dim=1).values


def _features(n: int, *, dim: int = 16, duplicates: bool = False, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)
    if duplicates:
        # identical rows and coarsely rounded values: many exact ties, also at the k-th place
        feats[10:40] = feats[3]
        feats[50:90] = feats[60]
        feats = torch.nn.functional.normalize(feats.round(decimals=1), dim=1)
    return feats


@pytest.mark.parametrize(
    ("n", "k", "block", "duplicates"),
    [
        (257, 7, 64, False),
        (257, 7, 64, True),
        (300, 21, 50, True),
        (40, 21, 16, False),
        (5, 9, 2, False),
        (1, 3, 4, False),
    ],
)
def test_self_knn_equals_the_stable_full_sort(n: int, k: int, block: int, duplicates: bool) -> None:
    feats = _features(n, duplicates=duplicates)
    graph = self_knn(feats, k, block=block, with_row_min=True)
    sims, positions, row_min = _reference(feats, min(k, n))
    assert torch.equal(graph.positions, positions)
    torch.testing.assert_close(graph.sims, sims, atol=1e-6, rtol=0)
    torch.testing.assert_close(graph.row_min, row_min, atol=1e-6, rtol=0)


def test_negative_zero_and_negative_similarities_keep_their_order() -> None:
    feats = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-0.6, -0.8]])
    graph = self_knn(feats, 5, block=2)
    assert torch.equal(graph.positions, _reference(feats, 5)[1])


def test_row_min_only_when_asked_and_bad_arguments_refused() -> None:
    assert self_knn(_features(20), 3).row_min.numel() == 0
    with pytest.raises(ValueError, match="k >= 1"):
        self_knn(_features(20), 0)
    with pytest.raises(ValueError, match="at least one row"):
        self_knn(torch.empty(0, 4), 3)


@pytest.mark.parametrize(
    ("nq", "k", "duplicates"), [(120, 7, False), (120, 7, True), (90, 21, True), (3, 7, False)]
)
def test_pooled_knn_with_a_kept_gallery_graph_equals_the_full_graph(
    nq: int, k: int, duplicates: bool
) -> None:
    feats = _features(257, duplicates=duplicates)
    queries, gallery = feats[:nq], feats[nq:]
    expected = self_knn(feats, k, block=64, with_row_min=True)
    knn._gallery_graphs.clear()
    for _ in range(2):  # the second call finds the gallery's graph kept
        graph = knn.pooled_knn(queries, gallery, k, with_row_min=True)
        assert torch.equal(graph.positions, expected.positions)
        assert torch.equal(graph.sims, expected.sims)
        assert torch.equal(graph.row_min, expected.row_min)
    assert len(knn._gallery_graphs) == 1


def test_gallery_graph_is_kept_per_content_and_bounded() -> None:
    knn._gallery_graphs.clear()
    a, b, c = _features(60, seed=1), _features(60, seed=2), _features(60, seed=3)
    first = knn.gallery_graph(a, 5)
    assert knn.gallery_graph(a.clone(), 5) is first  # same bytes, same graph
    knn.gallery_graph(b, 5)
    knn.gallery_graph(c, 5)
    assert len(knn._gallery_graphs) == knn.GALLERY_CACHE_SIZE
    assert knn.gallery_graph(a, 5) is not first  # evicted, computed again
    assert knn.gallery_graph(a, 40).positions.shape[1] == 40  # more than kept: computed with the larger k
    assert knn.gallery_graph(a, 3, cache=False).positions.shape[1] == knn.GALLERY_K


@pytest.mark.parametrize("nq", [120, 3])
def test_pooled_knn_reads_the_asked_pairs_from_its_tiles(nq: int) -> None:
    feats = _features(257)
    queries, gallery = feats[:nq], feats[nq:]
    gen = torch.Generator().manual_seed(3)
    candidates = torch.randint(0, gallery.shape[0], (nq, 15), generator=gen)
    knn._gallery_graphs.clear()
    graph = knn.pooled_knn(queries, gallery, 7, candidates=candidates)
    expected = torch.einsum("qd,qkd->qk", queries, gallery[candidates])
    torch.testing.assert_close(graph.pair_sims, expected, atol=1e-6, rtol=0)
    assert self_knn(feats, 7).pair_sims.numel() == 0
