"""capret: caption-augmented image retrieval.

``capret.load(path)`` opens any exported model folder (each says its ``kind``: dualstream, detector, combiner,
phi, pic2word, lincir, ...) as its typed model (see :mod:`capret.api` and docs/api.md);
``capret.load_model(path)`` returns a trained dual-stream model with ``encode_images`` / ``encode_captions``;
``capret.RetrievalPipeline.load(folder).search(photo)`` ranks a gallery for a photo (see the README);
:mod:`capret.api` re-exports the rest of the public surface.

Layout, bottom to top (a package imports only the ones below it; ``tests/test_layout.py`` checks it):
:mod:`capret.config`, :mod:`capret.registry`, :mod:`capret.io`, :mod:`capret.errors`, :mod:`capret.console`
(shared foundations) -> :mod:`capret.data` (dataset readers) -> the :mod:`captioning` package ->
:mod:`capret.models`, :mod:`capret.losses`, :mod:`capret.retrieval`, :mod:`capret.evaluation` ->
:mod:`capret.engine` (the training loop) -> :mod:`capret.inference` (loading trained models, embedding, CIR
search) and :mod:`capret.tasks` (one module per trainable task) -> :mod:`capret.api`, :mod:`capret.testing` ->
:mod:`capret.cli`, :mod:`capret.quickstart` and :mod:`capret.serve` (the only places that parse command lines
or serve requests).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Match", "RetrievalPipeline", "__version__", "load", "load_model"]

_LAZY = {"RetrievalPipeline": "capret.inference.query.pipeline", "Match": "capret.inference.query.pipeline"}


def __getattr__(name: str) -> Any:
    """``capret.RetrievalPipeline`` without importing torch and faiss at ``import capret``."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'capret' has no attribute {name!r}")


def load(path: Any, *, kind: str | None = None, device: Any = None) -> Any:
    """Open any exported capret model folder as its typed model (see :func:`capret.inference.model_kinds.load`)."""
    from capret.inference.model_kinds import load as _load

    return _load(path, kind=kind, device=device)


def load_model(path: Any, *, device: Any = None) -> Any:
    """Load a trained capret model folder for feature extraction (see :func:`capret.inference.dualstream.encoding.load_model`)."""
    from capret.inference.dualstream.encoding import load_model as _load_model

    return _load_model(path, device=device)
