"""The public facade: what a user imports from ``capret`` (see the README's feature-extraction API).

Everything here is a re-export; the code lives in :mod:`capret.inference`.
"""

from __future__ import annotations

from capret.inference.cir.combiner import load_cir_model
from capret.inference.detectors import Detection, Detector, create_detector, load_detector
from capret.inference.dualstream.encoding import (
    ItemRetrieval,
    RetrievalModel,
    encode_items,
    evaluate_items,
    item_transform,
    load_dual_stream_weights,
    load_model,
)
from capret.inference.query.gallery import Gallery, build_gallery, finish_gallery
from capret.inference.query.pipeline import Match, PipelineConfig, RetrievalPipeline, SearchResult

__all__ = [
    "Detection",
    "Detector",
    "Gallery",
    "ItemRetrieval",
    "Match",
    "PipelineConfig",
    "RetrievalPipeline",
    "SearchResult",
    "build_gallery",
    "create_detector",
    "finish_gallery",
    "RetrievalModel",
    "encode_items",
    "evaluate_items",
    "item_transform",
    "load_cir_model",
    "load_detector",
    "load_dual_stream_weights",
    "load_model",
]
