"""Search benchmark: exact top-k at DeepFashion2-validation scale and a 1M-vector approximate index.

Prints ONE JSON object. Part 1: 12,550 queries x 24,012 gallery items, 512-d, top-20, for the exact torch
backend, faiss flat and a numpy matmul + argpartition baseline; each as seconds and as a ratio to the bare matrix
product ``q @ g.T`` in torch on this machine (the floor any exact method pays). Part 2, galleries beyond memory:
over ``--n`` (default 1,000,000) clustered ``--dim``-d vectors, recall@10 against exact search and QPS (1,000
queries, one batch) of faiss flat, IVF-PQ with PQ codes only, IVF-PQ with the default exact re-scoring of a
shortlist (``IVFPQ_DEFAULTS``, ``nlist = 4 sqrt(n)``), the same index built from ``--shards`` memory-mapped shards
with on-disk inverted lists (re-scoring read from the shards), and optionally HNSW; plus the peak resident memory
of building the default IVF-PQ from one in-memory array versus from the shards, each measured in its own
subprocess (``VmHWM``; ``resource.getrusage``'s ``ru_maxrss`` is printed too but survives ``exec`` on Linux, so
a child of this large parent inherits its peak), next to the bare interpreter's peak after the same imports.

    python scripts/bench/search.py [--n 1000000] [--dim 64] [--shards 8] [--hnsw] [--skip-exact] [--skip-approx]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from capret.retrieval.index import IVFPQ_DEFAULTS, create_index, load_index
from capret.retrieval.sharded import (
    ShardedIVFIndex,
    ShardWriter,
    build_ivf_from_shards,
    merge_manifests,
    open_features,
)


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


def _recall(ids: np.ndarray, ref: np.ndarray) -> float:
    return round(float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)])), 4)


def _child(args: list[str]) -> dict:
    """Run one build in a fresh interpreter and return its JSON line (peak RSS is the child's own)."""
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True, env=os.environ.copy()
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_child(mode: str, data: Path, out: Path, nlist: int) -> None:
    """``--_build MODE``: build the default IVF-PQ from one array (``array``) or from the shards (``shards``),
    or do nothing (``none``: the interpreter's own peak RSS after the imports), and print peak RSS."""
    start = time.perf_counter()
    if mode == "array":
        vectors = np.load(data / "all.npy")
        index = create_index("ivfpq", vectors.shape[1], nlist=nlist)
        index.add(vectors)
        index.save(out / "refined.faiss")
    elif mode == "shards":
        build_ivf_from_shards(open_features(data / "shards"), out / "sharded", nlist=nlist, on_disk=True)
    # ru_maxrss survives exec on Linux (a child forked from this big parent starts with the parent's peak), so the
    # peak of this process image alone is read from VmHWM, which exec resets; both are printed.
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    status = Path("/proc/self/status").read_text().splitlines()
    hwm = [line for line in status if line.startswith("VmHWM:")]
    peak_mb = int(hwm[0].split()[1]) / 1024 if hwm else maxrss_mb
    seconds = round(time.perf_counter() - start, 2)
    row = {
        "mode": mode,
        "seconds": seconds,
        "peak_rss_mb": round(peak_mb, 1),
        "ru_maxrss_mb": round(maxrss_mb, 1),
    }
    print(json.dumps(row))


def _exact_references(g: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, dict]:
    """Exact top-10 (torch, the reference) and faiss flat, freed before the builds run."""
    exact = create_index("exact", g.shape[1], device="cpu")
    exact.add(g)
    t_exact, (_, ref) = _timed(lambda: exact.search(q, 10))
    flat = create_index("flat", g.shape[1])
    flat.add(g)
    t, (_, ids) = _timed(lambda: flat.search(q, 10))
    indexes = {
        "exact_torch": {"recall@10": 1.0, "qps": round(len(q) / t_exact)},
        "faiss_flat": {"recall@10": _recall(ids, ref), "qps": round(len(q) / t)},
    }
    return ref, indexes


def approx_scale(rng: np.random.Generator, *, n: int, dim: int, nq: int, shards: int, hnsw: bool) -> dict:
    """Recall@10 against exact search and QPS of each index over ``n`` clustered vectors, and the peak RSS of
    building the default IVF-PQ from one in-memory array versus from memory-mapped shards (in subprocesses)."""
    g = _clustered(rng, n, dim, clusters=5000)
    q = _clustered(rng, nq, dim, clusters=5000)
    nlist = int(min(4096, max(64, 4 * np.sqrt(n))))
    result: dict = {"vectors": n, "dim": dim, "queries": nq, "nlist": nlist, "shards": shards}
    ref, indexes = _exact_references(g, q)
    with tempfile.TemporaryDirectory(prefix="capret-bench-") as tmp:
        data = Path(tmp)
        np.save(data / "all.npy", g)
        writer = ShardWriter(data / "shards", dim=dim)
        for i, rows in enumerate(np.array_split(np.arange(n), shards)):
            writer.write(i, g[rows], [{"id": int(r)} for r in rows])
        merge_manifests(data / "shards")
        del g
        baseline = _child(["--_build", "none", "--_data", tmp, "--_nlist", str(nlist)])
        from_array = _child(["--_build", "array", "--_data", tmp, "--_nlist", str(nlist)])
        from_shards = _child(["--_build", "shards", "--_data", tmp, "--_nlist", str(nlist)])
        result["build"] = {
            "interpreter_after_imports_peak_rss_mb": baseline["peak_rss_mb"],
            "from_one_array": from_array,
            "from_shards_on_disk_lists": from_shards,
        }
        refined = load_index(data / "refined.faiss")
        defaults = {k: v for k, v in IVFPQ_DEFAULTS.items() if k != "nlist"}
        for name, refine in (
            ("ivfpq_pq_only", 1),
            ("ivfpq_refined_default", IVFPQ_DEFAULTS["refine_factor"]),
        ):
            refined.refine_factor = refine  # type: ignore[attr-defined]
            refined._apply_search_params()  # type: ignore[attr-defined]
            t, (_, ids) = _timed(lambda: refined.search(q, 10))
            indexes[name] = {"recall@10": _recall(ids, ref), "qps": round(nq / t), "refine_factor": refine}
        indexes["ivfpq_refined_default"]["options"] = {"nlist": nlist, **defaults, "m": dim // 2}
        sharded = ShardedIVFIndex(data / "sharded")
        t, (_, ids) = _timed(lambda: sharded.search(q, 10))
        indexes["ivfpq_sharded_on_disk"] = {"recall@10": _recall(ids, ref), "qps": round(nq / t)}
        if hnsw:
            index = create_index("hnsw", dim)
            t_build, _ = _timed(lambda: index.add(np.load(data / "all.npy")))
            t, (_, ids) = _timed(lambda: index.search(q, 10))
            indexes["hnsw"] = {
                "recall@10": _recall(ids, ref),
                "qps": round(nq / t),
                "build_seconds": round(t_build, 1),
            }
    result["indexes"] = indexes
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the approximate index")
    p.add_argument("--dim", type=int, default=64, help="dimension of the approximate-index vectors")
    p.add_argument("--shards", type=int, default=8, help="shards of the sharded build")
    p.add_argument("--hnsw", action="store_true", help="also build HNSW (minutes at 1M)")
    p.add_argument("--skip-exact", action="store_true", help="skip the DeepFashion2-scale exact part")
    p.add_argument("--skip-approx", action="store_true")
    p.add_argument("--_build", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_data", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_nlist", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._build is not None:
        build_child(args._build, args._data, args._data, args._nlist)
        return
    rng = np.random.default_rng(0)
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "platform": platform.platform(),
            "load_average_1min": round(os.getloadavg()[0], 2),
        },
    }
    if not args.skip_exact:
        result["exact_deepfashion2_validation_scale"] = exact_scale(rng, nq=12_550, ng=24_012, dim=512, k=20)
    if not args.skip_approx:
        result["approximate"] = approx_scale(
            rng, n=args.n, dim=args.dim, nq=1000, shards=args.shards, hnsw=args.hnsw
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
