"""Sharded features and IVF-PQ built from shards: equal to the in-memory build, refine recall, resume, manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from capret.errors import DataError
from capret.retrieval.index import create_index, load_index
from capret.retrieval.sharded import (
    ShardedIVFIndex,
    ShardWriter,
    build_ivf_from_shards,
    merge_manifests,
    open_features,
)


def _clustered(n: int, dim: int, *, seed: int = 0, clusters: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write(directory: Path, data: np.ndarray, *, world_size: int, shard_rows: int) -> None:
    """Rows split over ranks like ``torchrun`` would (contiguous blocks per rank), shards of ``shard_rows``."""
    blocks = np.array_split(np.arange(len(data)), world_size)
    for rank, rows in enumerate(blocks):
        writer = ShardWriter(directory, rank=rank, world_size=world_size, dim=data.shape[1], meta={"t": 1})
        for shard, start in enumerate(range(0, len(rows), shard_rows)):
            sel = rows[start : start + shard_rows]
            writer.write(shard, data[sel], [{"id": f"row{r}"} for r in sel], span=(start, start + len(sel)))
    merge_manifests(directory)


def test_sharded_features_round_trip_and_gather(tmp_path: Path) -> None:
    data = _clustered(1000, 8)
    _write(tmp_path, data, world_size=3, shard_rows=128)
    features = open_features(tmp_path)
    assert features.rows == 1000 and features.dim == 8 and len(features.shards) == 3 * 3
    np.testing.assert_array_equal(features.read_all(), data)  # rank blocks are contiguous, so order is kept
    assert [r["id"] for r in features.items()] == [f"row{i}" for i in range(1000)]
    rows = np.array([[999, 0, 5], [-1, 512, 333]])
    expected = np.where((rows >= 0)[..., None], data[rows.clip(0)], 0.0)
    np.testing.assert_array_equal(features.gather(rows), expected)
    features.verify()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "capret-sharded-features" and manifest["rows"] == 1000
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])


def test_missing_rank_and_bad_shard_are_named(tmp_path: Path) -> None:
    data = _clustered(100, 4)
    ShardWriter(tmp_path, rank=0, world_size=2, dim=4).write(0, data[:50], [{"id": i} for i in range(50)])
    with pytest.raises(DataError, match=r"missing for ranks \[1\]"):
        open_features(tmp_path)
    ShardWriter(tmp_path, rank=1, world_size=2, dim=4).write(0, data[50:], [{"id": i} for i in range(50)])
    features = open_features(tmp_path)  # merged in memory from the rank manifests
    assert features.rows == 100
    np.save(tmp_path / "features_r1_00000.npy", data[50:] * 2)
    with pytest.raises(DataError, match="checksum"):
        features.verify()
    with pytest.raises(DataError, match="world_size"):
        ShardWriter(tmp_path, rank=0, world_size=3, dim=4)


def test_writer_resumes_after_finished_shards(tmp_path: Path) -> None:
    data = _clustered(60, 4)
    writer = ShardWriter(tmp_path, dim=4, meta={"model": "m"})
    writer.write(0, data[:20], [{"id": i} for i in range(20)], span=(0, 20))
    (tmp_path / "features_r0_00001.tmp.npy").write_bytes(b"torn")  # a killed write leaves an unlisted file
    again = ShardWriter(tmp_path, dim=4, meta={"model": "m"})
    assert again.done(0) and not again.done(1)
    again.write(1, data[20:], [{"id": i} for i in range(20, 60)], span=(20, 60))
    np.testing.assert_array_equal(open_features(tmp_path).read_all(), data)
    with pytest.raises(DataError, match="another job"):
        ShardWriter(tmp_path, dim=4, meta={"model": "other"})


@pytest.mark.parametrize("on_disk", [True, False])
def test_build_from_shards_equals_in_memory_build(tmp_path: Path, on_disk: bool) -> None:
    data = _clustered(3000, 16, seed=1)
    queries = _clustered(40, 16, seed=2)
    _write(tmp_path / "feats", data, world_size=2, shard_rows=700)
    options = {"nlist": 16, "nprobe": 4, "refine_factor": 4, "max_train": 1000}
    memory = create_index("ivfpq", 16, **options)
    memory.add(data)
    expected_scores, expected_ids = memory.search(queries, 10)

    build_ivf_from_shards(open_features(tmp_path / "feats"), tmp_path / "index", on_disk=on_disk, **options)
    sharded = ShardedIVFIndex(tmp_path / "index")
    scores, ids = sharded.search(queries, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert sharded.ntotal == 3000
    assert (tmp_path / "index" / "lists.ivfdata").is_file() == on_disk
    assert not (tmp_path / "index" / "parts.tmp").exists()


def test_refine_restores_recall_against_exact() -> None:
    data = _clustered(5000, 32, seed=3, clusters=20)
    queries = _clustered(100, 32, seed=4, clusters=20)
    exact = create_index("exact", 32, device="cpu")
    exact.add(data)
    _, ref = exact.search(queries, 10)

    def recall(index_ids: np.ndarray) -> float:
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(index_ids, ref)]))

    common = {"nlist": 32, "nprobe": 8, "m": 4, "max_train": 5000}
    plain = create_index("ivfpq", 32, refine_factor=0, **common)
    plain.add(data)
    refined = create_index("ivfpq", 32, refine_factor=16, **common)
    refined.add(data)
    r_plain, r_refined = recall(plain.search(queries, 10)[1]), recall(refined.search(queries, 10)[1])
    assert r_refined >= 0.95 and r_refined > r_plain + 0.1, (r_plain, r_refined)
    # the refined scores are exact inner products
    scores, ids = refined.search(queries[:5], 10)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries[:5], data[ids]), rtol=1e-5, atol=1e-6)


def test_refined_ivfpq_saves_and_loads(tmp_path: Path) -> None:
    data = _clustered(600, 16)
    index = create_index("ivfpq", 16, nlist=8, refine_factor=3, nprobe=2)
    index.add(data, np.arange(600) + 1000)
    index.save(tmp_path / "i.faiss")
    loaded = load_index(tmp_path / "i.faiss")
    assert loaded.kind == "ivfpq" and loaded.refine_factor == 3 and loaded.nprobe == 2
    for a, b in zip(index.search(data[:5], 5), loaded.search(data[:5], 5)):
        np.testing.assert_array_equal(a, b)
    assert index.search(data[:1], 1)[1][0, 0] == 1000
