"""Models: encoders behind one registry (``encoders``), the dual-stream retrieval model (``dual_stream``), the
CLIP4Cir Combiner and zero-shot CIR models.

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
