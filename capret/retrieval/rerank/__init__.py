"""Rerankers of a global top-K ranking behind one registry and one call signature.

:mod:`.base` (protocol, registry, shared input checks) <- :mod:`.global_` (``aqe``, ``superglobal``,
``kreciprocal``) and :mod:`.geometric` (SIFT + RANSAC spatial verification, batched RANSAC in :mod:`.ransac`).
The built-in rerankers are registered lazily: :func:`create_reranker` imports a reranker's module on first use,
so listing names (CLI choices) imports neither kornia nor the reranking code.
"""

from capret.retrieval.rerank.base import (
    FeatureReranker,
    ImageRef,
    Reranker,
    RerankInputs,
    append_tail,
    candidate_scores,
    create_reranker,
    list_rerankers,
    prepare_inputs,
    register_reranker,
    sort_rows,
)
from capret.retrieval.rerank.global_ import AlphaQueryExpansion, KReciprocalRerank, SuperGlobalRerank

__all__ = [
    "AlphaQueryExpansion",
    "FeatureReranker",
    "ImageRef",
    "KReciprocalRerank",
    "Reranker",
    "RerankInputs",
    "SuperGlobalRerank",
    "append_tail",
    "candidate_scores",
    "create_reranker",
    "list_rerankers",
    "prepare_inputs",
    "register_reranker",
    "sort_rows",
]
