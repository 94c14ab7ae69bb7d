"""Retrieval quality against per-query latency for every captioner x reranker of the quickstart pipeline.

The latency table (``query_latency.py``) and the ablation table sit apart; this puts them on one chart. For each
query captioner — ``none`` (the image-only path), ``template`` (pixel colour statistics), ``clip`` (zero-shot
attribute captions from the quickstart's CLIP, ``OUT/clip``) and ``served`` (the OpenAI-compatible backend against
the loopback ``capret.testing.ChatServer`` answering after ``--server-delay`` seconds: a *simulated* VLM whose
latency is real round trips but whose captions are canned, so its quality says nothing about a real VLM) — and
each reranker (``none`` and every registered one), it searches the garment world's validation queries with
``RetrievalPipeline.search`` (ground-truth box given, as the quickstart's pipeline stage does) and records:

* ``map`` — mean average precision over the returned top ``--k`` (each query's AP divided by
  ``min(k, relevant gallery items)``), ``top1`` and ``topk`` hit rates;
* ``p50_ms`` / ``p95_ms`` — per-query wall time of ``search`` (every caption a cache miss).

It writes one JSON (``--json``) and one PNG (``--png``): mAP against p50 latency (log scale), one marker per
captioner and one colour per reranker, the Pareto front (no other point both faster and better) drawn and listed.

    python scripts/bench/pareto.py --quickstart OUT [--queries 40] [--png docs/pareto.png] [--json pareto.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

# this folder holds a benchmark named captioning.py, which would shadow the captioning package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from capret.data.deepfashion2 import gt_box_protocol, image_path, load_items  # noqa: E402
from capret.inference.query.captioner import Captioner  # noqa: E402
from capret.inference.query.pipeline import RetrievalPipeline  # noqa: E402
from capret.retrieval.rerank import create_reranker, list_rerankers  # noqa: E402
from capret.testing import ChatServer  # noqa: E402
from captioning.backends import create_backend  # noqa: E402

CAPTIONERS = ("none", "template", "clip", "served")


def _where(path: str | Path) -> str:
    return str(Path(path).resolve())


def average_precision(hits: list[bool], relevant: int) -> float:
    """AP of one ranked list truncated at its length: mean precision at each hit over ``min(len, relevant)``."""
    if relevant <= 0:
        return 0.0
    found, total = 0, 0.0
    for rank, hit in enumerate(hits, start=1):
        if hit:
            found += 1
            total += found / rank
    return total / min(len(hits), relevant) if hits else 0.0


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (lower-or-equal latency and higher-or-equal quality, one strict)."""
    front = []
    for i, (lat, quality) in enumerate(points):
        dominated = any(
            (lo <= lat and q >= quality) and (lo < lat or q > quality)
            for j, (lo, q) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _measure(
    pipeline: RetrievalPipeline,
    queries: list[tuple[Path, tuple[float, ...], int]],
    *,
    label_of: dict[tuple[str, tuple[float, ...]], int],
    relevant: dict[int, int],
    use_captions: bool,
    k: int,
) -> dict[str, Any]:
    path, box, _ = queries[-1]
    pipeline.search(path, k=k, boxes=[box], use_captions=use_captions)  # warm-up (not scored)
    times, aps, top1, topk = [], [], 0, 0
    for path, box, label in queries[:-1]:
        start = time.perf_counter()
        matches = pipeline.search(path, k=k, boxes=[box], use_captions=use_captions)
        times.append((time.perf_counter() - start) * 1000)
        hits = [label_of.get((_where(m.image), tuple(m.box or ())), -1) == label for m in matches]
        aps.append(average_precision(hits, relevant.get(label, 0)))
        top1 += bool(hits) and hits[0]
        topk += any(hits)
    n = len(times)
    return {
        "map": round(float(np.mean(aps)), 4),
        "top1": round(top1 / n, 4),
        "topk": round(topk / n, 4),
        "p50_ms": round(float(np.percentile(times, 50)), 2),
        "p95_ms": round(float(np.percentile(times, 95)), 2),
    }


def _plot(rows: list[dict[str, Any]], front: list[int], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    markers = {"none": "o", "template": "s", "clip": "^", "served": "D"}
    rerankers = sorted({r["reranker"] for r in rows})
    colours = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(rerankers)}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for row in rows:
        ax.scatter(row["p50_ms"], row["map"], marker=markers[row["captioner"]], color=colours[row["reranker"]],
                   s=60, edgecolors="black", linewidths=0.5, zorder=3)  # fmt: skip
    ax.plot([rows[i]["p50_ms"] for i in front], [rows[i]["map"] for i in front], "k--", lw=1,
            zorder=2, drawstyle="steps-post", label="Pareto front")  # fmt: skip
    for n, i in enumerate(front):  # labels alternate above and below the front so neighbours do not overlap
        label = f"{rows[i]['captioner']}+{rows[i]['reranker']}"
        ax.annotate(label, (rows[i]["p50_ms"], rows[i]["map"]), textcoords="offset points",
                    xytext=(5, 5 if n % 2 == 0 else -12), fontsize=8)  # fmt: skip
    for name, marker in markers.items():
        ax.scatter([], [], marker=marker, color="white", edgecolors="black",
                   label=f"captioner: {name}" + (" (simulated)" if name == "served" else ""))  # fmt: skip
    for name in rerankers:
        ax.scatter([], [], marker="o", color=colours[name], label=f"reranker: {name}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("p50 latency per query (ms, log scale)")
    ax.set_ylabel("mAP (top-k list)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _title(result: dict[str, Any]) -> str:
    return (
        f"garment world quickstart, {result['date']}: {result['queries']} queries, {result['gallery_items']} gallery "
        f"items, top {result['k']}\n(served VLM simulated: loopback server, "
        f"{result['served']['delay_ms_per_request']:.0f} ms/request; shared loaded 2-core CPU)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quickstart", type=Path, default=None, help="capret quickstart output (pipeline, clip, world)"
    )
    p.add_argument("--from-json", type=Path, default=None, help="only redraw --png from an earlier --json")
    p.add_argument("--queries", type=int, default=40, help="validation queries searched per combination")
    p.add_argument("--k", type=int, default=20, help="length of the ranked list")
    p.add_argument("--rerank-topk", type=int, default=50, help="head results a reranker reorders")
    p.add_argument("--captioners", nargs="+", default=list(CAPTIONERS), choices=CAPTIONERS)
    p.add_argument("--rerankers", nargs="+", default=["none", *list_rerankers()])
    p.add_argument("--server-delay", type=float, default=0.05, help="simulated VLM seconds per request")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--png", type=Path, default=Path("docs/pareto.png"))
    p.add_argument("--json", type=Path, default=Path("pareto.json"))
    args = p.parse_args()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        _plot(saved["rows"], pareto_front([(r["p50_ms"], r["map"]) for r in saved["rows"]]), args.png,
              title=_title(saved))  # fmt: skip
        return
    if args.quickstart is None:
        p.error("--quickstart is required (unless --from-json)")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    root = args.quickstart / "world" / "deepfashion2"
    queries_set, gallery_set = gt_box_protocol(load_items(root, "validation", progress=False))
    label_of = {
        (_where(image_path(root, "validation", it.image_id)), tuple(float(v) for v in it.bbox)): int(label)
        for it, label in zip(gallery_set.items, gallery_set.labels)
    }
    labels, counts = np.unique(gallery_set.labels, return_counts=True)
    relevant = {int(a): int(b) for a, b in zip(labels, counts)}
    step = max(1, len(queries_set.items) // (args.queries + 1))
    chosen = list(range(0, len(queries_set.items), step))[: args.queries + 1]
    queries = [
        (image_path(root, "validation", queries_set.items[q].image_id),
         tuple(float(v) for v in queries_set.items[q].bbox), int(queries_set.labels[q]))
        for q in chosen
    ]  # fmt: skip

    pipeline = RetrievalPipeline.load(args.quickstart / "pipeline")
    pipeline.rerank_topk = args.rerank_topk
    rows: list[dict[str, Any]] = []
    with ChatServer(latency=args.server_delay) as server:

        def fresh(name: str) -> Captioner | None:
            """A new captioner (its memory cache empty, so every query is a cache miss)."""
            if name == "none":
                return None
            if name == "template":
                return Captioner(create_backend("template"), cache=None)
            if name == "clip":
                return Captioner(create_backend("clip", model=str(args.quickstart / "clip")), cache=None)
            return Captioner(
                create_backend("openai", base_urls=[server.base_url], vlm="loopback"), cache=None
            )

        for captioner in args.captioners:
            for reranker in args.rerankers:
                pipeline.reranker = None if reranker == "none" else create_reranker(reranker)
                pipeline.captioner = fresh(captioner)
                try:
                    row: dict[str, Any] = {"captioner": captioner, "reranker": reranker}
                    row.update(
                        _measure(pipeline, queries, label_of=label_of, relevant=relevant,
                                 use_captions=captioner != "none", k=args.k)
                    )  # fmt: skip
                finally:
                    if pipeline.captioner is not None:
                        pipeline.captioner.close()
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    pipeline.close()

    front = pareto_front([(r["p50_ms"], r["map"]) for r in rows])
    for i, row in enumerate(rows):
        row["pareto"] = i in front
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "note": "shared machine, loaded by other jobs while measuring: latencies are upper bounds",
        },
        "quickstart": str(args.quickstart),
        "gallery_items": len(pipeline.gallery),
        "queries": len(queries) - 1,
        "k": args.k,
        "rerank_topk": args.rerank_topk,
        "served": {
            "simulated": True,
            "server": "loopback ChatServer",
            "delay_ms_per_request": args.server_delay * 1000,
        },  # fmt: skip
        "rows": rows,
        "pareto_front": [f"{rows[i]['captioner']}+{rows[i]['reranker']}" for i in front],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    _plot(rows, front, args.png, title=_title(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
