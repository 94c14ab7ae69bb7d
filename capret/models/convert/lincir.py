"""LinCIR's released phi (navervision/lincir): ``lincir_large.pt`` and the ``phi_best.pt`` of ``train_phi.py``.

``train_phi.py``'s ``save_phi`` writes ``{"epoch": step, "Phi": phi.state_dict()}``; ``models.py``'s ``Phi`` is
SEARLE's (``layers`` 0/3/6, GELU, Dropout 0.5) with input = the CLIP text projection size and output = the token
width (ViT-L/14: 768 -> 3072 -> 768; ViT-bigG/14: 1280 -> 5120 -> 1280). LinCIR runs Hugging Face CLIPs
(``openai/clip-vit-large-patch14``), so ``--clip`` defaults to the hf backend for this source.
"""

from __future__ import annotations

from pathlib import Path

from capret.models.convert.common import MappedCheckpoint
from capret.models.convert.searle import convert_phi_file

__all__ = ["convert_lincir"]


def convert_lincir(path: Path, *, extra: Path | None = None) -> MappedCheckpoint:
    """LinCIR's phi file -> :class:`capret.models.zeroshot.Phi` (dropout 0.5, ``--phi_dropout``'s default)."""
    return convert_phi_file(path, extra=extra, source="LinCIR")
