"""capret: caption-augmented image retrieval.

``capret.load_model(path)`` returns a trained model with ``encode_images`` / ``encode_captions`` (see the README).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(path: Any, *, device: Any = None) -> Any:
    """Load a trained capret model folder for feature extraction (see :func:`capret.inference.dualstream.load_model`)."""
    from capret.inference.dualstream import load_model as _load_model

    return _load_model(path, device=device)
