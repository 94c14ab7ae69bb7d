"""Indexes: faiss flat equals the exact torch reference; IVF-PQ/HNSW recall@10 against exact; ids, padding,
chunking and save/load round trips."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from capret.retrieval.index import create_index, exact_topk, list_indexes, load_index


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    """faiss' OpenMP k-means is pathologically slow when the CI cores are oversubscribed; one thread is steady."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _normed(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(
    rng: np.random.Generator, n: int, dim: int, *, clusters: int = 50, noise: float = 0.35, latent: int = 12
) -> np.ndarray:
    """Cluster structure in a ``latent``-dimensional subspace (real embeddings have a low intrinsic dimension),
    lifted to ``dim`` by a fixed random map, plus a little isotropic noise."""
    centres = rng.standard_normal((clusters, latent))
    z = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, latent))
    lift = np.random.default_rng(123).standard_normal((latent, dim))
    return _normed(z @ lift + 0.05 * rng.standard_normal((n, dim)))


def _recall_at(ids: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, reference)]))


def test_list_and_unknown_name() -> None:
    assert list_indexes() == ["exact", "flat", "hnsw", "ivfpq"]
    with pytest.raises(KeyError, match="valid names: exact, flat, hnsw, ivfpq"):
        create_index("annoy", 8)


def test_exact_topk_chunked_equals_full_sort() -> None:
    rng = np.random.default_rng(0)
    q, g = (
        torch.from_numpy(_normed(rng.standard_normal((37, 16)))),
        torch.from_numpy(_normed(rng.standard_normal((301, 16)))),
    )
    full = q @ g.T
    ref_scores, ref_pos = full.sort(dim=1, descending=True)
    scores, pos = exact_topk(q, g, 20, max_block=300)  # forces many query and gallery chunks
    assert torch.equal(pos, ref_pos[:, :20])
    torch.testing.assert_close(scores, ref_scores[:, :20])


def test_flat_equals_exact_with_arbitrary_ids() -> None:
    rng = np.random.default_rng(1)
    g, q = _normed(rng.standard_normal((2000, 32))), _normed(rng.standard_normal((50, 32)))
    ids = rng.choice(10**12, size=2000, replace=False).astype(np.int64)
    exact, flat = create_index("exact", 32), create_index("flat", 32)
    for index in (exact, flat):
        index.add(g[:1200], ids[:1200])
        index.add(torch.from_numpy(g[1200:]), ids[1200:])  # torch input, a second add
    es, ei = exact.search(q, 10)
    fs, fi = flat.search(q, 10)
    assert ei.dtype == np.int64 and es.dtype == np.float32 and ei.shape == (50, 10)
    assert (ei == fi).all()
    np.testing.assert_allclose(es, fs, atol=1e-5)
    brute = np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :10]
    assert (ei == ids[brute]).all()


@pytest.mark.parametrize("name", ["exact", "flat", "hnsw"])
def test_fewer_items_than_k_pads_with_minus_one(name: str) -> None:
    rng = np.random.default_rng(2)
    index = create_index(name, 8)
    index.add(_normed(rng.standard_normal((3, 8))))
    scores, ids = index.search(_normed(rng.standard_normal((2, 8))), 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert sorted(ids[0, :3].tolist()) == [0, 1, 2]


def test_ivfpq_and_hnsw_recall_against_exact() -> None:
    rng = np.random.default_rng(3)
    g = _clustered(rng, 8_000, 32)
    q = _clustered(rng, 200, 32)
    exact = create_index("exact", 32)
    exact.add(g)
    _, ref = exact.search(q, 10)
    ivf = create_index("ivfpq", 32, nlist=32, nprobe=8)
    ivf.add(g)
    hnsw = create_index("hnsw", 32)
    hnsw.add(g)
    recall_ivf = _recall_at(ivf.search(q, 10)[1], ref)
    recall_hnsw = _recall_at(hnsw.search(q, 10)[1], ref)
    print(f"recall@10 vs exact: ivfpq={recall_ivf:.3f} hnsw={recall_hnsw:.3f}")
    assert recall_ivf > 0.5
    assert recall_hnsw > 0.9


@pytest.mark.parametrize(
    ("name", "options"), [("exact", {}), ("flat", {}), ("ivfpq", {"nlist": 16}), ("hnsw", {})]
)
def test_save_load_round_trip(tmp_path: Path, name: str, options: dict) -> None:
    rng = np.random.default_rng(4)
    g, q = _clustered(rng, 1000, 16), _clustered(rng, 20, 16)
    index = create_index(name, 16, **options)
    index.add(g, np.arange(1000) * 7 + 3)
    before = index.search(q, 5)
    index.save(tmp_path / "index.bin")
    loaded = load_index(tmp_path / "index.bin")
    assert loaded.ntotal == 1000 and loaded.kind == name
    after = loaded.search(q, 5)
    assert (before[1] == after[1]).all()
    np.testing.assert_allclose(before[0], after[0], atol=1e-6)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    index = create_index("exact", 4)
    with pytest.raises(ValueError, match=r"shape \[n, 4\]"):
        index.add(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="ids for 2 vectors"):
        index.add(np.zeros((2, 4), np.float32), [1])
    with pytest.raises(ValueError, match="needs at least nlist=32"):
        create_index("ivfpq", 8, nlist=32).add(np.ones((10, 8), np.float32))
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_index(tmp_path / "missing.bin")
