"""Rerankers of a global top-K ranking behind one registry and one call signature.

:mod:`.base` (protocol, registry, shared input checks) <- :mod:`.global_` (``aqe``, ``superglobal``,
``kreciprocal``) and :mod:`.geometric` (SIFT + RANSAC spatial verification, batched RANSAC in :mod:`.ransac`).
Importing this package registers every built-in reranker.
"""

from capret.retrieval.rerank import geometric, global_  # noqa: F401  (registration)
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
    require_image_refs,
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
    "require_image_refs",
    "sort_rows",
]
