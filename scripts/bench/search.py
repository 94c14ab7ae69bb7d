"""Search benchmark: exact top-k at DeepFashion2-validation scale and a 1M-vector approximate index.

Prints ONE JSON object. Part 1: 12,550 queries x 24,012 gallery items, 512-d, top-20, for the exact torch
backend, faiss flat and a numpy matmul + argpartition baseline; each as seconds and as a ratio to the bare matrix
product ``q @ g.T`` in torch on this machine (the floor any exact method pays). Part 2: IVF-PQ (default) or HNSW
over ``--n`` (default 1,000,000) clustered ``--dim``-d vectors: build and search seconds for 1,000 queries and
recall@10 against exact search.

    python scripts/bench/search.py [--n 1000000] [--dim 64] [--approx ivfpq|hnsw] [--skip-approx]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import faiss
import numpy as np
import torch

from capret.retrieval.index import create_index


def _normed(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def _clustered(rng: np.random.Generator, n: int, dim: int, *, clusters: int, latent: int = 16) -> np.ndarray:
    """Features with cluster structure in a low-dimensional subspace (like real embeddings), chunked to save RAM."""
    centres = rng.standard_normal((clusters, latent)).astype(np.float32)
    lift = rng.standard_normal((latent, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        z = centres[rng.integers(0, clusters, m)] + 0.4 * rng.standard_normal((m, latent)).astype(np.float32)
        out[s : s + m] = _normed(z @ lift + 0.05 * rng.standard_normal((m, dim)).astype(np.float32))
    return out


def _timed(fn, repeats: int = 1) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def numpy_topk(q: np.ndarray, g: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """The obvious numpy baseline: matmul, argpartition the top k, sort those k."""
    out = np.empty((q.shape[0], k), dtype=np.int64)
    for s in range(0, q.shape[0], chunk):
        sims = q[s : s + chunk] @ g.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
        out[s : s + chunk] = np.take_along_axis(part, order, 1)
    return out


def exact_scale(rng: np.random.Generator, *, nq: int, ng: int, dim: int, k: int) -> dict:
    q = _clustered(rng, nq, dim, clusters=3000)
    g = _clustered(rng, ng, dim, clusters=3000)
    qt, gt = torch.from_numpy(q), torch.from_numpy(g)

    # the bare product, in the same 2,048-query blocks so memory matches what the indexes use
    t_mm, _ = _timed(lambda: [qt[s : s + 2048] @ gt.T for s in range(0, nq, 2048)], repeats=2)
    exact = create_index("exact", dim, device="cpu")
    exact.add(g)
    t_exact, (_, ids_exact) = _timed(lambda: exact.search(q, k), repeats=2)
    flat = create_index("flat", dim)
    flat.add(g)
    t_flat, (_, ids_flat) = _timed(lambda: flat.search(q, k), repeats=2)
    t_np, ids_np = _timed(lambda: numpy_topk(q, g, k))
    agree = float((ids_exact == ids_flat).mean())
    return {
        "queries": nq,
        "gallery": ng,
        "dim": dim,
        "k": k,
        "bare_matmul_seconds": round(t_mm, 3),
        "exact_torch": {"seconds": round(t_exact, 3), "ratio_to_matmul": round(t_exact / t_mm, 2)},
        "faiss_flat": {"seconds": round(t_flat, 3), "ratio_to_matmul": round(t_flat / t_mm, 2)},
        "numpy_argpartition": {"seconds": round(t_np, 3), "ratio_to_matmul": round(t_np / t_mm, 2)},
        "flat_vs_exact_id_agreement": round(agree, 5),
        "numpy_vs_exact_id_agreement": round(float((ids_np == ids_exact).mean()), 5),
    }


def approx_scale(rng: np.random.Generator, *, n: int, dim: int, nq: int, kind: str) -> dict:
    g = _clustered(rng, n, dim, clusters=5000)
    q = _clustered(rng, nq, dim, clusters=5000)
    exact = create_index("exact", dim, device="cpu")
    exact.add(g)
    t_exact, (_, ref) = _timed(lambda: exact.search(q, 10))
    if kind == "ivfpq":
        nlist = int(min(4096, max(64, 4 * np.sqrt(n))))
        index = create_index("ivfpq", dim, nlist=nlist, nprobe=32, max_train=min(n, 50 * nlist))
        options = {"nlist": nlist, "nprobe": 32, "m": dim // 4, "nbits": 8}
    else:
        index = create_index("hnsw", dim)
        options = {"m": 32, "ef_construction": 80, "ef_search": 128}
    t_build, _ = _timed(lambda: index.add(g))
    t_search, (_, ids) = _timed(lambda: index.search(q, 10))
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)]))
    return {
        "index": kind,
        "options": options,
        "vectors": n,
        "dim": dim,
        "queries": nq,
        "build_seconds": round(t_build, 2),
        "search_seconds": round(t_search, 3),
        "exact_search_seconds": round(t_exact, 3),
        "recall@10_vs_exact": round(recall, 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the approximate index")
    p.add_argument("--dim", type=int, default=64, help="dimension of the approximate-index vectors")
    p.add_argument("--approx", choices=["ivfpq", "hnsw"], default="ivfpq")
    p.add_argument("--skip-approx", action="store_true")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "platform": platform.platform(),
            "load_average_1min": round(os.getloadavg()[0], 2),
        },
        "exact_deepfashion2_validation_scale": exact_scale(rng, nq=12_550, ng=24_012, dim=512, k=20),
    }
    if not args.skip_approx:
        result["approximate"] = approx_scale(rng, n=args.n, dim=args.dim, nq=1000, kind=args.approx)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
