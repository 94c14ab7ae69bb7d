"""Models (architectures only; training lives in :mod:`capret.tasks`, loading for inference in
:mod:`capret.inference`): encoders behind one registry (:mod:`.encoders`), the dual-stream retrieval model
(:mod:`.dual_stream`), Hugging Face CLIP with its CIR preprocessing (:mod:`.clip`) and the CLIP4Cir fusers behind
the combiner registry (:mod:`.combiner`).

Submodules are imported on demand (``from capret.models.dual_stream import DualStreamModel``) so that importing
``capret.models`` does not pull in timm or transformers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_encoder", "list_encoders", "register_encoder"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from capret.models import encoders

        return getattr(encoders, name)
    raise AttributeError(f"module 'capret.models' has no attribute {name!r}")
