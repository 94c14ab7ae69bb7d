"""The public facade: what a user imports from ``capret``, and the contract of a capret model folder.

``capret.load(path)`` opens any exported model folder and returns its typed model::

    import capret

    model = capret.load("runs/dualstream/model")        # RetrievalModel: encode_images / encode_captions
    detector = capret.load("runs/detector/model")       # TrainedDetector: detect(images)
    combiner = capret.load("runs/combiner/stage2/model")  # CombinerModel: clip + fuser
    phi = capret.load("runs/phi/model")                 # ZeroShotModel: query_features(...)

Contract (every writer of a model folder follows it; :mod:`capret.models.folder` holds the helpers):

* A model folder holds ``capret_model.json`` =
  ``{"kind": <kind>, "format": "capret.<kind>/<n>", "config": <the model config>, ...}`` plus its weights as
  ``*.safetensors`` (never pickle) and any offline assets (tokenizer, processor) in sub-folders. Write it with
  :func:`capret.models.folder.write_model_config`.
* ``kind`` is a lower-case identifier naming the typed model :func:`load` returns. Built in: ``dualstream``,
  ``detector``, ``combiner``, ``phi``, ``pic2word``, ``lincir``; ``clip`` (a fine-tuned CLIP) is the next one.
  ``config`` is the *model* config only (what rebuilds the architecture), never the trainer's or data's
  settings; provenance goes in extra top-level keys (e.g. ``"trained_from"``, ``"converted_from"``).
* A kind's loader is ``loader(folder: Path, *, device) -> model``, registered with
  ``@capret.inference.model_kinds.register_model_kind("<kind>")`` in the inference module that owns the typed
  model, and named in that module's ``_LAZY`` table so ``capret.load`` finds it without an import by the caller.
* ``load(path)`` accepts the model folder itself, a training checkpoint (``checkpoint.json``) or a run folder
  (its ``model/``, else ``best/``, else newest ``checkpoints/step_*``). Folders written before ``kind`` existed
  still open: their kind is inferred from their files (:func:`capret.models.folder.folder_kind`).
* ``load(path, kind="detector")`` insists on a kind; a folder of another kind raises
  :class:`capret.models.folder.ModelFolderError` (a :class:`capret.errors.CapretError`) naming both.
* The older loaders (``load_model``, ``load_cir_model``, ``load_zeroshot_model``, ``load_detector``,
  ``ClipSpec.load`` on a folder) forward to :func:`load` and keep their return types.

Everything here is a re-export; the code lives in :mod:`capret.inference` and :mod:`capret.models`.
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
from capret.inference.model_kinds import list_model_kinds, load, register_model_kind
from capret.inference.query.gallery import Gallery, build_gallery, finish_gallery
from capret.inference.query.pipeline import Match, PipelineConfig, RetrievalPipeline, SearchResult
from capret.models.folder import MODEL_CONFIG_FILE, ModelFolderError, folder_kind, write_model_config

__all__ = [
    "MODEL_CONFIG_FILE",
    "Detection",
    "Detector",
    "Gallery",
    "ItemRetrieval",
    "Match",
    "ModelFolderError",
    "PipelineConfig",
    "RetrievalPipeline",
    "SearchResult",
    "build_gallery",
    "create_detector",
    "finish_gallery",
    "folder_kind",
    "RetrievalModel",
    "encode_items",
    "evaluate_items",
    "item_transform",
    "list_model_kinds",
    "load",
    "load_cir_model",
    "load_detector",
    "load_dual_stream_weights",
    "load_model",
    "register_model_kind",
    "write_model_config",
]
