"""SEARLE's released phi (miccunifi/SEARLE): ``SEARLE_ViT-B32.pt`` / ``SEARLE_ViT-L14.pt``.

``hubconf.py`` loads ``torch.load(file)["Phi"]`` into ``src/phi.py``'s ``Phi``: ``layers`` = ``Linear(in, h)``,
GELU, Dropout(0.5), ``Linear(h, h)``, GELU, Dropout, ``Linear(h, out)``; ViT-B/32 512 -> 2048 -> 512, ViT-L/14
768 -> 3072 -> 768. ``train_phi.py``'s ``save_phi`` writes the same ``{"epoch", "Phi": state_dict}``.
:class:`capret.models.zeroshot.Phi` has the same ``layers`` indices, so names carry over unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from capret.errors import CheckpointError
from capret.models.convert.common import (
    MAPPER_SIZES,
    MappedCheckpoint,
    check_module_state,
    read_tensor_file,
    strip_prefix,
    unused_entries,
)
from capret.models.zeroshot import Phi

__all__ = ["PHI_KEYS", "convert_phi_file", "convert_searle", "map_phi_state", "phi_payload"]

#: the tensors of SEARLE's / LinCIR's Phi, in their names (and ours)
PHI_KEYS = tuple(f"layers.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias"))


def phi_payload(payload: Any, *, path: Path) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Any]]:
    """The Phi state dict of a ``{"Phi": sd, ...}`` file (or a bare state dict), the other entries with why they
    are not loaded, and the small metadata worth recording."""
    if isinstance(payload, dict) and isinstance(payload.get("Phi"), dict):
        dropped, metadata = unused_entries(
            payload, used=("Phi",), reason="training bookkeeping, not a weight of phi"
        )
        return strip_prefix(payload["Phi"]), dropped, metadata
    if isinstance(payload, dict) and all(isinstance(v, Tensor) for v in payload.values()):
        return strip_prefix(payload), {}, {}
    entries = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
    raise CheckpointError(f"{path}: no 'Phi' state dict (entries: {entries})", path=path)


def map_phi_state(
    state: dict[str, Tensor], *, path: Path, dropout: float
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Check a Phi state dict and derive its sizes; every key outside :data:`PHI_KEYS` is an error."""
    sizes = check_module_state(state, path=path, sizes=MAPPER_SIZES, build=Phi, what="phi")
    return {k: state[k] for k in PHI_KEYS}, {**sizes, "dropout": dropout}


def convert_phi_file(path: Path, *, extra: Path | None, source: str) -> MappedCheckpoint:
    """A released phi file -> :class:`capret.models.zeroshot.Phi` (dropout 0.5). SEARLE and LinCIR both save
    ``{"Phi": state_dict}`` of the same three-layer MLP, so one mapping serves both; ``source`` names the project
    in messages."""
    if extra is not None:
        raise CheckpointError(
            f"{extra}: {source}'s phi is one file; --clip-checkpoint is for clip4cir", path=extra
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


def convert_searle(path: Path, *, extra: Path | None = None) -> MappedCheckpoint:
    """SEARLE's phi file -> :class:`capret.models.zeroshot.Phi` (dropout 0.5, as ``hubconf.py`` builds it)."""
    return convert_phi_file(path, extra=extra, source="SEARLE")
