"""Kind ``clip``: the loader :func:`capret.load` uses for a CLIP folder exported by ``capret-train`` task ``clip``.

The folder is open_clip's ``local-dir:`` layout plus ``capret_model.json`` (:mod:`capret.models.clip_arch`);
what comes back is the :class:`~capret.models.openclip.OpenClipBundle` every composed-retrieval method, the
``clip`` caption backend and the zero-shot metrics take: the model with its tokenizer and preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from capret.inference.model_kinds import register_model_kind
from capret.models.clip_arch import CLIP_KIND, load_clip_folder
from capret.models.openclip import OpenClipBundle

__all__ = ["load_trained_clip"]


@register_model_kind(CLIP_KIND)
def load_trained_clip(folder: str | Path, *, device: str | torch.device | None = None) -> OpenClipBundle:
    """The exported CLIP in ``folder`` (evaluation mode, target-padded preprocessing as in CLIP4Cir)."""
    return load_clip_folder(folder, device=device or "cpu")
