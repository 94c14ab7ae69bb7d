"""The public facade: what a user imports from ``capret`` (see the README's feature-extraction API).

Everything here is a re-export; the code lives in :mod:`capret.inference`.
"""

from __future__ import annotations

from capret.inference.dualstream import (
    ItemRetrieval,
    RetrievalModel,
    encode_items,
    evaluate_items,
    item_transform,
    load_dual_stream_weights,
    load_model,
)
from capret.inference.loading import load_cir_model

__all__ = [
    "ItemRetrieval",
    "RetrievalModel",
    "encode_items",
    "evaluate_items",
    "item_transform",
    "load_cir_model",
    "load_dual_stream_weights",
    "load_model",
]
