"""capret: caption-augmented image retrieval.

``capret.load_model(path)`` returns a trained model with ``encode_images`` / ``encode_captions``;
``capret.RetrievalPipeline.load(folder).search(photo)`` ranks a gallery for a photo (see the README).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Match", "RetrievalPipeline", "__version__", "load_model"]

_LAZY = {"RetrievalPipeline": "capret.inference.pipeline", "Match": "capret.inference.pipeline"}


def __getattr__(name: str) -> Any:
    """``capret.RetrievalPipeline`` without importing torch and faiss at ``import capret``."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'capret' has no attribute {name!r}")


def load_model(path: Any, *, device: Any = None) -> Any:
    """Load a trained capret model folder for feature extraction (see :func:`capret.inference.dualstream.load_model`)."""
    from capret.inference.dualstream import load_model as _load_model

    return _load_model(path, device=device)
