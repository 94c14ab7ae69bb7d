"""Catalogue benchmark (LanceDB): ingest, filtered and unfiltered search, growth, and the side-by-side with faiss.

Prints ONE JSON object:

- ``ingest``: rows/s appending ready rows (no model: the table's own cost) and photos/s through the model stages
  (detect -> template caption -> embed with a small ResNet-18 / MiniLM dual-stream model, random weights);
- ``search``: over ``--rows`` clustered ``--dim``-d vectors (default 1M x 256 for the report; the 2-core default
  of ``--rows`` is smaller), IVF-PQ built by ``optimize``, p50/p95 latency of one query and recall@10 against
  exact search, without and with a category prefilter (a category holding a quarter of the rows);
- ``growth``: appending ``--add`` rows to the indexed table (time), recall@10 right after (new rows are searched
  by a flat scan) and after ``optimize`` folds them in (time);
- ``faiss``: the same queries on the default faiss IVF-PQ of ``scripts/bench/search.py`` (``nlist = 4 sqrt(n)``,
  exact re-scoring), and the ratios catalogue / faiss of p50 latency and of recall;
- ``engines``: the model stages on the local engine vs the Ray Data engine (``--ray``; ``ray.init(num_cpus=2)``),
  wall time ratio ray / local for the same photos.

    python scripts/bench/catalogue.py [--rows 1000000] [--dim 256] [--queries 100] [--add 10000] [--ray]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from _common import ARCHITECTURES, TINY  # noqa: E402  (from this folder, before it leaves the path below)

# this folder holds captioning.py, which would shadow the `captioning` package; the repository comes first
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import numpy as np  # noqa: E402
import torch  # noqa: E402

from capret.catalogue import Catalogue, CatalogueSettings  # noqa: E402
from capret.catalogue.schema import model_fingerprint  # noqa: E402
from capret.retrieval.index import create_index  # noqa: E402
from capret.testing import synthetic_catalogue_rows  # noqa: E402

FINGERPRINT = "b" * 16


def _percentiles(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
    }


def _exact_topk(
    vectors: np.ndarray, queries: np.ndarray, k: int, mask: np.ndarray | None = None
) -> np.ndarray:
    scores = queries @ vectors.T
    if mask is not None:
        scores[:, ~mask] = -np.inf
    return np.argsort(-scores, axis=1)[:, :k]


def _recall(found: list[list[str]], truth: np.ndarray, ids: np.ndarray) -> float:
    hits = [len(set(f) & set(ids[t].tolist())) / truth.shape[1] for f, t in zip(found, truth)]
    return round(float(np.mean(hits)), 4)


def _search(
    catalogue: Catalogue, queries: np.ndarray, k: int, category: str | None, refine: int | None = None
) -> tuple[list, list]:
    times, found = [], []
    for q in queries:
        start = time.perf_counter()
        hits = catalogue.search(q[None], k, category=category, refine_factor=refine)[0]
        times.append(time.perf_counter() - start)
        found.append([h["id"] for h in hits])
    return times, found


def table_part(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    settings = CatalogueSettings(
        model="synthetic", fingerprint=FINGERPRINT, dim=args.dim, root=str(tmp), index_threshold=10_000
    )
    if args.nprobes:
        settings.nprobes = args.nprobes
    if args.refine_factor:
        settings.refine_factor = args.refine_factor
    catalogue = Catalogue.create(tmp / "cat", settings=settings)
    vectors, categories, ids = [], [], []
    start = time.perf_counter()
    with catalogue.writing():
        for offset in range(0, args.rows, args.batch):
            n = min(args.batch, args.rows - offset)
            rows = synthetic_catalogue_rows(
                args.dim,
                n,
                seed=1000 * 7 + offset // args.batch,
                fingerprint=FINGERPRINT,
                start=offset,
                clusters=args.clusters,
            )
            catalogue.add_rows(rows)
            vectors.append(np.stack(rows.column("vector").to_numpy(zero_copy_only=False)))
            categories.extend(rows.column("category").to_pylist())
            ids.extend(rows.column("id").to_pylist())
    ingest_s = time.perf_counter() - start
    start = time.perf_counter()
    optimized = catalogue.optimize()
    optimize_s = time.perf_counter() - start
    matrix = np.concatenate(vectors)
    del vectors
    id_array = np.asarray(ids)
    dress = np.asarray([c == "dress" for c in categories])
    queries = np.stack(
        synthetic_catalogue_rows(
            args.dim,
            args.queries,
            seed=1000 * 7 + 999,
            fingerprint=FINGERPRINT,
            start=10**8,
            clusters=args.clusters,
        )
        .column("vector")
        .to_numpy(zero_copy_only=False)
    )
    k = 10
    truth = _exact_topk(matrix, queries, k)
    truth_dress = _exact_topk(matrix, queries, k, dress)
    catalogue.search(queries[:2], k)  # warm the index cache
    t_all, f_all = _search(catalogue, queries, k, None)
    t_cat, f_cat = _search(catalogue, queries, k, "dress")
    search = {
        "rows": args.rows,
        "dim": args.dim,
        "queries": args.queries,
        "index": optimized["actions"][0],
        "nprobes": catalogue.settings.nprobes,
        "refine_factor": catalogue.settings.refine_factor,
        "unfiltered": {**_percentiles(t_all), "recall@10": _recall(f_all, truth, id_array)},
        "category_filter": {
            **_percentiles(t_cat),
            "recall@10": _recall(f_cat, truth_dress, id_array),
            "category_share": round(float(dress.mean()), 3),
        },
    }
    if args.sweep_refine:
        sweep = []
        for refine in args.sweep_refine:
            t_a, f_a = _search(catalogue, queries, k, None, refine)
            t_c, f_c = _search(catalogue, queries, k, "dress", refine)
            sweep.append(
                {
                    "refine_factor": refine,
                    "unfiltered": {**_percentiles(t_a), "recall@10": _recall(f_a, truth, id_array)},
                    "category_filter": {
                        **_percentiles(t_c),
                        "recall@10": _recall(f_c, truth_dress, id_array),
                    },
                }
            )
        search["refine_sweep"] = sweep
        good = [
            e
            for e in sweep
            if min(e["unfiltered"]["recall@10"], e["category_filter"]["recall@10"]) >= args.goal
        ]
        if good:  # the smallest refine factor reaching the goal serves the growth part
            catalogue.settings.refine_factor = good[0]["refine_factor"]
            search["chosen_refine_factor"] = good[0]["refine_factor"]
    result: dict[str, Any] = {
        "ingest_no_model": {
            "rows": args.rows,
            "seconds": round(ingest_s, 2),
            "rows_per_s": round(args.rows / ingest_s),
            "batch_rows": args.batch,
        },
        "optimize_seconds": round(optimize_s, 2),
        "search": search,
    }
    if args.add:
        extra = synthetic_catalogue_rows(
            args.dim,
            args.add,
            seed=1000 * 7 + 500,
            fingerprint=FINGERPRINT,
            start=args.rows,
            clusters=args.clusters,
        )
        start = time.perf_counter()
        with catalogue.writing():
            catalogue.add_rows(extra)
        add_s = time.perf_counter() - start
        matrix = np.concatenate([matrix, np.stack(extra.column("vector").to_numpy(zero_copy_only=False))])
        id_array = np.concatenate([id_array, np.asarray(extra.column("id").to_pylist())])
        truth = _exact_topk(matrix, queries, k)
        t_before, f_before = _search(catalogue, queries, k, None)
        start = time.perf_counter()
        catalogue.optimize()
        fold_s = time.perf_counter() - start
        t_after, f_after = _search(catalogue, queries, k, None)
        result["growth"] = {
            "added_rows": args.add,
            "refine_factor": catalogue.settings.refine_factor,
            "add_seconds": round(add_s, 2),
            "before_optimize": {**_percentiles(t_before), "recall@10": _recall(f_before, truth, id_array)},
            "optimize_seconds": round(fold_s, 2),
            "after_optimize": {**_percentiles(t_after), "recall@10": _recall(f_after, truth, id_array)},
        }
    if not args.skip_faiss:
        nlist = int(min(4096, max(64, 4 * np.sqrt(matrix.shape[0]))))
        index = create_index("ivfpq", args.dim, nlist=nlist)
        start = time.perf_counter()
        index.add(matrix, np.arange(matrix.shape[0], dtype=np.int64))
        build_s = time.perf_counter() - start
        times, found = [], []
        for q in queries:
            t0 = time.perf_counter()
            _, rows = index.search(q[None], k)
            times.append(time.perf_counter() - t0)
            found.append([id_array[r] for r in rows[0] if r >= 0])
        faiss_result = {**_percentiles(times), "recall@10": _recall(found, truth, id_array)}
        own = result.get("growth", {}).get("after_optimize") or search["unfiltered"]
        result["faiss_ivfpq"] = {
            "nlist": nlist,
            "build_seconds": round(build_s, 2),
            **faiss_result,
            "p50_ratio_catalogue_over_faiss": round(own["p50_ms"] / max(faiss_result["p50_ms"], 1e-6), 2),
            "recall_ratio_catalogue_over_faiss": round(
                own["recall@10"] / max(faiss_result["recall@10"], 1e-6), 3
            ),
        }
    return result


def _photos(folder: Path, count: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        array = rng.integers(0, 255, size=(30, 24, 3), dtype=np.uint8)
        paths.append(folder / f"{i:05d}.jpg")
        Image.fromarray(array).resize((240, 300), Image.Resampling.BILINEAR).save(paths[-1], quality=90)
    return paths


def model_part(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from capret.catalogue import add_images, create_engine
    from capret.models.dual_stream import DualStreamModel

    torch.manual_seed(0)
    model = DualStreamModel(ARCHITECTURES[TINY]).save_pretrained(tmp / "model")
    photos = _photos(tmp / "photos" / "shop", args.photos)
    engines = ["local"] + (["ray"] if args.ray else [])
    out: dict[str, Any] = {
        "photos": args.photos,
        "model": "resnet18@64px + MiniLM, random weights, template captions",
    }
    for name in engines:
        settings = CatalogueSettings(
            model=str(model),
            fingerprint=model_fingerprint(model),
            dim=128,
            root=str(tmp / "photos"),
            captioner={
                "backend": "template",
                "options": {},
                "prompt_set": "capret-chat-v1",
                "loop": {},
                "cache": None,
            },
        )
        catalogue = Catalogue.create(tmp / f"cat_{name}", settings=settings)
        options: dict[str, Any] = {"num_cpus": 2} if name == "ray" else {}
        engine = create_engine(name, **options)
        start = time.perf_counter()
        report = add_images(catalogue, photos, engine=engine, batch_images=16)
        seconds = time.perf_counter() - start
        out[name] = {"seconds": round(seconds, 2), "photos_per_s": round(report["added_images"] / seconds, 2)}
        if hasattr(engine, "shutdown"):
            engine.shutdown()
    if "ray" in out:
        out["ray_over_local_wall_ratio"] = round(out["ray"]["seconds"] / out["local"]["seconds"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows", type=int, default=200_000, help="catalogue rows (the report used 1,000,000)"
    )
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=1000, help="clusters of the synthetic vectors")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--batch", type=int, default=50_000, help="rows per committed batch")
    parser.add_argument("--add", type=int, default=10_000, help="rows added to the indexed table (0: skip)")
    parser.add_argument("--nprobes", type=int, default=0, help="override the catalogue's nprobes")
    parser.add_argument("--refine-factor", type=int, default=0, help="override the catalogue's refine factor")
    parser.add_argument(
        "--sweep-refine", type=int, nargs="*", default=[50, 100, 200], help="refine factors also measured"
    )
    parser.add_argument("--goal", type=float, default=0.95, help="recall@10 a swept refine factor must reach")
    parser.add_argument("--photos", type=int, default=64, help="photos through the model stages")
    parser.add_argument("--ray", action="store_true", help="also the Ray Data engine (ray.init(num_cpus=2))")
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model stages")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)  # OpenMP spin-waits badly on a loaded 2-core machine
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "note": "shared, loaded 2-core machine",
        }
    }
    with tempfile.TemporaryDirectory(prefix="capret-catalogue-bench-") as tmp:
        if not args.skip_table:
            result.update(table_part(args, Path(tmp) / "table"))
        if not args.skip_model:
            result["ingest_with_model"] = model_part(args, Path(tmp) / "model")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
