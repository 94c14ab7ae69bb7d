"""Search and reranking: exact/faiss indexes behind one registry (:mod:`.index`) and the rerankers of a global
top-K (:mod:`.rerank`: shared protocol and input checks in ``base``, ``aqe`` / ``superglobal`` /
``kreciprocal`` in ``global_``, SIFT + RANSAC geometric verification in ``geometric`` and ``ransac``)."""

from capret.retrieval.index import create_index, exact_topk, list_indexes, load_index, register_index
from capret.retrieval.rerank import create_reranker, list_rerankers, register_reranker

__all__ = [
    "create_index",
    "create_reranker",
    "exact_topk",
    "list_indexes",
    "list_rerankers",
    "load_index",
    "register_index",
    "register_reranker",
]
