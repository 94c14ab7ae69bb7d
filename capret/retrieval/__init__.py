"""Search and reranking: exact/faiss indexes (:mod:`.index`), global rerankers (:mod:`.rerank`) and SIFT +
RANSAC geometric verification (:mod:`.geometric`)."""

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
