"""LinCIR's released phi (navervision/lincir): ``lincir_large.pt`` and the ``phi_best.pt`` of ``train_phi.py``.

``train_phi.py``'s ``save_phi`` writes ``{"epoch": step, "Phi": phi.state_dict()}``; ``models.py``'s ``Phi`` is
SEARLE's (``layers`` 0/3/6, GELU, Dropout 0.5) with input = the CLIP text projection size and output = the token
width (ViT-L/14: 768 -> 3072 -> 768; ViT-bigG/14: 1280 -> 5120 -> 1280). LinCIR runs Hugging Face CLIPs
(``openai/clip-vit-large-patch14``), so ``--clip`` defaults to the hf backend for this source.
"""

from __future__ import annotations

from pathlib import Path

from capret.errors import CheckpointError
from capret.models.convert.common import MappedCheckpoint, read_tensor_file
from capret.models.convert.searle import map_phi_state, phi_payload

__all__ = ["convert_lincir"]


def convert_lincir(path: Path, *, extra: Path | None = None) -> MappedCheckpoint:
    """LinCIR's phi file -> :class:`capret.models.zeroshot.Phi` (dropout 0.5, ``--phi_dropout``'s default)."""
    if extra is not None:
        raise CheckpointError(
            f"{extra}: LinCIR's phi is one file; --clip-checkpoint is for clip4cir", path=extra
        )
    raw, dropped, metadata = phi_payload(read_tensor_file(path), path=path)
    state, hparams = map_phi_state(raw, path=path, dropout=0.5)
    return MappedCheckpoint(
        state=state,
        hparams=hparams,
        mapped={f"Phi.{k}": k for k in state},
        dropped=dropped,
        metadata=metadata,
    )
