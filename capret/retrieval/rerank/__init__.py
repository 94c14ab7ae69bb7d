"""Rerankers of a global top-K ranking behind one registry and one call signature.

:mod:`.base` (protocol, registry, shared input checks) <- :mod:`.global_` (``aqe``, ``superglobal``,
``kreciprocal``) and :mod:`.geometric` (SIFT + RANSAC spatial verification, batched RANSAC in :mod:`.ransac`).
The built-in rerankers are registered lazily: :func:`create_reranker` imports a reranker's module on first use,
so listing names (CLI choices) imports neither kornia nor the reranking code.
"""

from capret.retrieval.rerank import base
from capret.retrieval.rerank.base import *  # noqa: F403  (the protocol, registry and shared checks: base.__all__)
from capret.retrieval.rerank.global_ import AlphaQueryExpansion, KReciprocalRerank, SuperGlobalRerank

__all__ = [*base.__all__, "AlphaQueryExpansion", "KReciprocalRerank", "SuperGlobalRerank"]
