"""Fusion of a reference-image feature and a modifying-text feature for composed image retrieval.

Two fusers share one signature ``fuse(image_features, text_features) -> normalised query``:

* :class:`Combiner` — the learned fusion network of CLIP4Cir (Baldrati et al., "Effective conditioned and
  composed image retrieval combining CLIP-based features", CVPR-W 2022 and TOMM 2023, Sec. 3.2): both features
  are projected, concatenated and mapped back to CLIP space by an MLP, and a learned scalar λ mixes in a
  residual convex combination ``λ·text + (1-λ)·image``.
* :class:`ElementWiseSum` — ``normalize(image + text)``, the parameter-free fusion used while fine-tuning the
  CLIP text encoder in stage 1 and as the zero-training baseline.

Both are registered in the ``combiner`` family (``create_combiner("combiner", feature_dim=640)``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capret.registry import Registry

__all__ = [
    "LOGIT_SCALE",
    "Combiner",
    "ElementWiseSum",
    "batch_classification_loss",
    "create_combiner",
    "list_combiners",
    "register_combiner",
]

#: CLIP4Cir uses a fixed temperature: logits = 100 · query @ target.T
LOGIT_SCALE = 100.0

_COMBINERS: Registry[nn.Module] = Registry("combiner")


def register_combiner(name: str) -> Any:
    """Decorator registering a fusion module factory under ``name``."""
    return _COMBINERS.register(name)


def create_combiner(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered fuser; an unknown name raises with the list of valid names."""
    return _COMBINERS.create(name, **kwargs)


def list_combiners() -> list[str]:
    return _COMBINERS.names()


@register_combiner("sum")
class ElementWiseSum(nn.Module):
    """``normalize(image + text)``: CLIP4Cir's stage-1 fusion; it has no parameters."""

    def __init__(self, feature_dim: int | None = None) -> None:
        super().__init__()
        self.feature_dim = feature_dim

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(image_features + text_features, dim=-1)


@register_combiner("combiner")
class Combiner(nn.Module):
    """The CLIP4Cir Combiner network.

    Args:
        feature_dim: CLIP embedding size ``d`` (640 for RN50x4, 512 for ViT-B/32).
        projection_dim: width ``p`` of each modality's projection; defaults to ``4·d`` (2560 for RN50x4).
        hidden_dim: width ``h`` of the fusion MLP; defaults to ``8·d`` (5120 for RN50x4).
        dropout: dropout after every hidden layer (0.5 in the paper).
        logit_scale: fixed temperature of :meth:`logits` (100 in the paper).
    """

    def __init__(
        self,
        feature_dim: int,
        *,
        projection_dim: int | None = None,
        hidden_dim: int | None = None,
        dropout: float = 0.5,
        logit_scale: float = LOGIT_SCALE,
    ) -> None:
        super().__init__()
        if feature_dim <= 0:
            raise ValueError(f"feature_dim must be positive, got {feature_dim}")
        p = projection_dim or 4 * feature_dim
        h = hidden_dim or 8 * feature_dim
        self.feature_dim, self.projection_dim, self.hidden_dim = feature_dim, p, h
        self.logit_scale = logit_scale
        self.text_projection = nn.Sequential(nn.Linear(feature_dim, p), nn.ReLU(), nn.Dropout(dropout))
        self.image_projection = nn.Sequential(nn.Linear(feature_dim, p), nn.ReLU(), nn.Dropout(dropout))
        self.fusion = nn.Sequential(
            nn.Linear(2 * p, h), nn.ReLU(), nn.Dropout(dropout), nn.Linear(h, feature_dim)
        )
        # λ is predicted per sample from the same concatenated projections
        self.dynamic_scalar = nn.Sequential(
            nn.Linear(2 * p, h), nn.ReLU(), nn.Dropout(dropout), nn.Linear(h, 1), nn.Sigmoid()
        )

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """The normalised composed query ``[B, d]`` from raw CLIP image and text features ``[B, d]``."""
        joint = torch.cat(
            [self.text_projection(text_features), self.image_projection(image_features)], dim=-1
        )
        lam = self.dynamic_scalar(joint)
        fused = self.fusion(joint) + lam * text_features + (1 - lam) * image_features
        return F.normalize(fused, dim=-1)

    def logits(
        self, image_features: torch.Tensor, text_features: torch.Tensor, *, targets: torch.Tensor
    ) -> torch.Tensor:
        """``scale · query @ normalize(target).T``: the scores of every query against every target."""
        query = self(image_features, text_features)
        return self.logit_scale * query @ F.normalize(targets, dim=-1).T


def batch_classification_loss(
    query: torch.Tensor, targets: torch.Tensor, *, scale: float = LOGIT_SCALE
) -> torch.Tensor:
    """CLIP4Cir's batch-based classification loss.

    Query ``i`` must pick its own target among all targets of the batch: cross-entropy over
    ``scale · query @ normalize(targets).T`` with label ``i``. ``query`` is expected to be normalised already
    (both fusers return unit vectors); targets are normalised here.
    """
    if query.shape != targets.shape:
        raise ValueError(f"query {tuple(query.shape)} and targets {tuple(targets.shape)} must match")
    logits = scale * query @ F.normalize(targets, dim=-1).T
    labels = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(logits.float(), labels)
