"""Mapping networks of the zero-shot composed-retrieval methods: a CLIP feature in, a pseudo-word token out.

The predicted vector lives in the *input* token-embedding space of the CLIP text encoder and is injected for a
placeholder word (:meth:`capret.models.clip_base.ClipBundle.pseudo_token_features`).

* :class:`Phi` — SEARLE's textual-inversion network (Baldrati et al., ICCV 2023, Sec. 4.2): a 3-layer MLP with
  GELU and dropout 0.5, hidden width 4x the input (512 -> 2048 -> 512 for ViT-B/32). LinCIR (Gu et al., CVPR
  2024) uses the same shape with the CLIP *text* projection size as input and the token width as output.
* :class:`Pic2WordMapper` — Pic2Word's IM2TEXT (Saito et al., CVPR 2023): two blocks of Linear -> 512,
  Dropout 0.1, ReLU, then Linear(512 -> token width).

Each module records its sizes in ``hparams`` so a checkpoint can be rebuilt from its sidecar alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["MAPPERS", "Phi", "Pic2WordMapper", "build_mapper"]


class Phi(nn.Module):
    """SEARLE/LinCIR phi: ``Linear(in, h) GELU Drop Linear(h, h) GELU Drop Linear(h, out)``."""

    def __init__(
        self, input_dim: int, *, hidden_dim: int | None = None, output_dim: int, dropout: float = 0.5
    ):
        super().__init__()
        hidden = hidden_dim or 4 * input_dim
        self.hparams: dict[str, Any] = {
            "input_dim": input_dim,
            "hidden_dim": hidden,
            "output_dim": output_dim,
            "dropout": dropout,
        }
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, output_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class Pic2WordMapper(nn.Module):
    """Pic2Word IM2TEXT: ``2 x [Linear -> hidden, Dropout(0.1), ReLU]`` then ``Linear(hidden -> out)``."""

    def __init__(self, input_dim: int, *, hidden_dim: int = 512, output_dim: int, dropout: float = 0.1):
        super().__init__()
        self.hparams: dict[str, Any] = {
            "input_dim": input_dim,
            "hidden_dim": hidden_dim,
            "output_dim": output_dim,
            "dropout": dropout,
        }
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.Dropout(dropout),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.Dropout(dropout),
            nn.ReLU(),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


#: mapper family name -> class (the name is recorded in checkpoints)
MAPPERS: dict[str, type[nn.Module]] = {"phi": Phi, "pic2word": Pic2WordMapper}


def build_mapper(kind: str, hparams: dict[str, Any]) -> nn.Module:
    """Rebuild a mapper from its family name and ``hparams`` (as stored in a checkpoint sidecar)."""
    if kind not in MAPPERS:
        raise ValueError(f"mapper kind {kind!r} is unknown; valid: {', '.join(sorted(MAPPERS))}")
    args = dict(hparams)
    return MAPPERS[kind](args.pop("input_dim"), **args)
