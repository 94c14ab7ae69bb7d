"""Quickstart stage ``rerank``: every reranker on real photographs (the demo validation split).

The global ranking comes from an earlier stage's features — the training-free baseline descriptor
(``ctx.state["baseline"]``) when present, else the trained dual-stream model's (``ctx.state["dual_stream"]``) —
and each registered reranker reorders its head (:data:`RERANK_TOPK`: 20 for geometric, 100 for the
others) with shipped defaults (nothing tuned on this split). The demo
queries are consumer views of an item (perspective warps, occluders, clutter) and the gallery its shop view, so
SIFT + RANSAC geometric verification has real evidence to find; the transductive global rerankers (αQE/DBA,
SuperGlobal, k-reciprocal) only see the global descriptors.
"""

from __future__ import annotations

import time
from typing import Any

from capret.errors import UsageError
from capret.quickstart import QuickstartContext

__all__ = ["RERANKERS", "run"]

#: rerankers evaluated, in report order
RERANKERS = ("geometric", "aqe", "superglobal", "kreciprocal")

#: how many head results each reranker reorders. Geometric verification looks at the top 20 (SIFT + RANSAC per
#: pair is the costly part; on the demo split the true shop view sits in the global top 20 for most queries),
#: the global rerankers at the ``capret-eval`` default of 100.
RERANK_TOPK = {"geometric": 20, "aqe": 100, "superglobal": 100, "kreciprocal": 100}


def _global_features(ctx: QuickstartContext) -> tuple[str, dict[str, Any]]:
    needed = (
        "query_features",
        "gallery_features",
        "query_labels",
        "gallery_labels",
        "query_images",
        "gallery_images",
    )
    for source in ("baseline", "dual_stream"):
        state = ctx.state.get(source)
        if isinstance(state, dict) and all(key in state for key in needed):
            return source, state
    raise UsageError(
        "the rerank stage needs global features from the 'baseline' or 'dual_stream' stage in ctx.state "
        f"(keys {', '.join(needed)}); run those stages first"
    )


def _summary(metrics: dict[str, Any]) -> dict[str, float]:
    return {"map": float(metrics["map"]), "recall@1": float(metrics["recall@1"])}


def run(ctx: QuickstartContext) -> dict[str, Any]:
    """Evaluate the global ranking with and without each reranker; returns fractions per reranker."""
    from capret.evaluation.retrieval_eval import evaluate_embeddings

    source, state = _global_features(ctx)
    common = {
        "query_images": state["query_images"],
        "gallery_images": state["gallery_images"],
        "ks": (1, 5, 10),
    }
    features = (
        state["query_features"],
        state["gallery_features"],
        state["query_labels"],
        state["gallery_labels"],
    )
    report: dict[str, Any] = {"global_features": source}
    report["none"] = _summary(evaluate_embeddings(*features, **common))
    for name in RERANKERS:
        start = time.perf_counter()
        result = evaluate_embeddings(*features, rerank=name, rerank_topk=RERANK_TOPK[name], **common)
        report[name] = {
            **_summary(result["after"]),
            "rerank_topk": int(result["rerank_topk"]),
            "seconds": round(time.perf_counter() - start, 2),
        }
    report["seconds"] = {name: report[name]["seconds"] for name in RERANKERS}
    return report
