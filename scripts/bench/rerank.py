"""Reranking benchmark. Prints ONE JSON object.

* ``geometric``: per-query latency of SIFT + RANSAC verification of the top 100 with the gallery's local
  features already cached (the deployed situation), on real photographs (scikit-image's bundled images cut into
  100 gallery crops, queries are homography-warped crops).
* ``aqe``, ``superglobal``, ``kreciprocal``: wall and CPU time of each global reranker at DeepFashion2-validation
  scale (12,550 queries x 24,012 gallery items, 512-d L2-normalised random features with cluster structure),
  reranking the exact top ``--topk`` (default 100, the ``capret-eval --rerank-topk`` default), as a ratio to the
  exact search of the same run: ``cold`` (nothing kept) and ``_warm`` (the gallery's own k-NN graph kept from the
  run before, as within one process), plus the time of that gallery graph alone.

    python scripts/bench/rerank.py [--queries 12550] [--gallery 24012] [--topk 100] [--geo-queries 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data, transform

from capret.retrieval import knn
from capret.retrieval.index import create_index
from capret.retrieval.rerank import create_reranker

_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "coins",
    "text",
    "page",
    "immunohistochemistry",
)


def _photo(name: str) -> np.ndarray:
    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    return transform.resize(image[..., :3], (384, 384), anti_aliasing=True)


def _write(image: np.ndarray, path: Path) -> str:
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path, quality=92)
    return str(path)


def geometric_latency(root: Path, *, num_queries: int, topk: int) -> dict:
    rng = np.random.default_rng(0)
    photos = [_photo(n) for n in _PHOTOS]
    gallery = []
    for i in range(topk):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, 384 - 192, 2)
        gallery.append((_write(photo[y : y + 192, x : x + 192], root / f"g{i:03d}.jpg"), None))
    queries = []
    for i in range(num_queries):
        src = np.asarray(Image.open(gallery[i * 7][0]), dtype=np.float64) / 255.0
        h = np.array([[0.93, 0.1, 8.0], [-0.05, 1.0, 5.0], [2e-4, 1e-4, 1.0]])
        warped = transform.warp(src, np.linalg.inv(h), output_shape=src.shape[:2])
        queries.append((_write(warped, root / f"q{i:03d}.jpg"), None))
    ranking = np.stack([rng.permutation(topk) for _ in range(num_queries)])
    scores = np.sort(rng.random((num_queries, topk)).astype(np.float32), axis=1)[:, ::-1].copy()
    feats_q = rng.standard_normal((num_queries, 8)).astype(np.float32)
    feats_g = rng.standard_normal((topk, 8)).astype(np.float32)
    reranker = create_reranker("geometric", cache_dir=str(root / "cache"), progress=False, topk=topk)
    start = time.perf_counter()
    reranker.extractor.extract(gallery)  # type: ignore[attr-defined]  # fill the on-disk cache once
    cache_fill = time.perf_counter() - start
    fresh = create_reranker("geometric", cache_dir=str(root / "cache"), progress=False, topk=topk)
    start = time.perf_counter()
    new_rank, _ = fresh.rerank(
        ranking=ranking,
        scores=scores,
        query_features=feats_q,
        gallery_features=feats_g,
        query_images=queries,
        gallery_images=gallery,
    )
    seconds = time.perf_counter() - start
    correct = float(np.mean([new_rank[i, 0] == i * 7 for i in range(num_queries)]))
    return {
        "topk": topk,
        "queries": num_queries,
        "seconds_per_query": round(seconds / num_queries, 3),
        "gallery_cache_fill_seconds_per_image": round(cache_fill / topk, 4),
        "true_match_first_fraction": correct,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def _clustered(rng: np.random.Generator, n: int, *, centres: np.ndarray, lift: np.ndarray) -> np.ndarray:
    z = centres[rng.integers(0, centres.shape[0], n)] + 0.5 * rng.standard_normal((n, centres.shape[1]))
    x = z @ lift + 0.05 * rng.standard_normal((n, lift.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def global_times(*, nq: int, ng: int, dim: int, topk: int) -> dict:
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((3043, 32))  # as many clusters as DeepFashion2 validation has identities
    lift = rng.standard_normal((32, dim))
    q = _clustered(rng, nq, centres=centres, lift=lift)
    g = _clustered(rng, ng, centres=centres, lift=lift)
    index = create_index("exact", dim)
    index.add(g)
    # wall time, and CPU time of this process (the fairer figure on a shared machine); every reranker is given
    # as a ratio to the exact search of the same run
    wall, cpu = time.perf_counter(), time.process_time()
    scores, ranking = index.search(q, topk)
    out: dict = {"queries": nq, "gallery": ng, "dim": dim, "topk": topk}
    exact_wall, exact_cpu = time.perf_counter() - wall, time.process_time() - cpu
    out["exact_search_seconds"] = round(exact_wall, 2)
    out["exact_search_cpu_seconds"] = round(exact_cpu, 2)
    # "cold": nothing kept from an earlier reranking; "warm": the gallery's own k-NN graph is kept from the
    # previous run on the same gallery (another reranker, other settings, the next batch of queries), as
    # capret.retrieval.knn.gallery_graph does within a process. Rankings must not depend on it.
    for name in ("aqe", "superglobal", "kreciprocal"):
        knn._gallery_graphs.clear()
        rankings = []
        for mode in ("cold", "warm"):
            wall, cpu = time.perf_counter(), time.process_time()
            new_rank, _ = create_reranker(name).rerank(
                ranking=ranking, scores=scores, query_features=q, gallery_features=g
            )
            seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
            rankings.append(new_rank)
            suffix = "" if mode == "cold" else "_warm"
            out[f"{name}{suffix}_seconds"] = round(seconds, 2)
            out[f"{name}{suffix}_cpu_seconds"] = round(cpu_seconds, 2)
            out[f"{name}{suffix}_ratio_to_exact"] = round(seconds / exact_wall, 2)
            out[f"{name}{suffix}_cpu_ratio_to_exact"] = round(cpu_seconds / exact_cpu, 2)
        out[f"{name}_warm_same_ranking"] = bool((rankings[0] == rankings[1]).all())
    knn._gallery_graphs.clear()
    wall = time.perf_counter()
    knn.gallery_graph(torch.from_numpy(g), knn.GALLERY_K, cache=False)
    out["gallery_graph_seconds"] = round(time.perf_counter() - wall, 2)
    out["superglobal_m"] = min(400, topk)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=12_550)
    p.add_argument("--gallery", type=int, default=24_012)
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--geo-queries", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--skip-geometric", action="store_true", help="only the global rerankers")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    geo: dict = {"skipped": True}
    if not args.skip_geometric:
        with tempfile.TemporaryDirectory() as tmp:
            geo = geometric_latency(Path(tmp), num_queries=args.geo_queries, topk=100)
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "geometric": geo,
        "global": global_times(nq=args.queries, ng=args.gallery, dim=512, topk=args.topk),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
