"""Fusion of a reference-image feature and a modifying-text feature for composed image retrieval.

Two fusers share one signature ``fuse(image_features, text_features) -> normalised query``:

* :class:`Combiner` — the learned fusion network of CLIP4Cir (Baldrati et al., "Effective conditioned and
  composed image retrieval combining CLIP-based features", CVPR-W 2022 and TOMM 2023, Sec. 3.2): both features
  are projected, concatenated and mapped back to CLIP space by an MLP, and a learned scalar λ mixes in a
  residual convex combination ``λ·text + (1-λ)·image``.
* :class:`ElementWiseSum` — ``normalize(image + text)``, the parameter-free fusion used while fine-tuning the
  CLIP text encoder in stage 1 and as the zero-training baseline.

Both are registered in the ``combiner`` family (``create_combiner("combiner", feature_dim=640)``).

The model's config lives here too (:class:`CombinerModelConfig`, with :class:`CombinerRecord` = stage + model,
what a ``combiner`` model folder records), with :func:`build_fuser` and :func:`upgrade_config_dict`: the training
task (:mod:`capret.tasks.combiner`) and inference (:mod:`capret.inference.cir.combiner`) both read them, so a
model is rebuilt from its folder without the training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from capret.config import cfg, move_flat_keys, same_name_in
from capret.errors import ConfigError
from capret.models.clip import FLAT_CLIP_FEATURE_KEYS, TaskClipConfig
from capret.registry import Registry

__all__ = [
    "LOGIT_SCALE",
    "Combiner",
    "CombinerModelConfig",
    "CombinerNetConfig",
    "CombinerRecord",
    "ElementWiseSum",
    "batch_classification_loss",
    "build_fuser",
    "create_combiner",
    "list_combiners",
    "register_combiner",
    "upgrade_config_dict",
]

#: CLIP4Cir uses a fixed temperature: logits = 100 · query @ target.T
LOGIT_SCALE = 100.0

_COMBINERS: Registry[nn.Module] = Registry("combiner")
register_combiner, create_combiner, list_combiners = _COMBINERS.functions()


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
            raise ConfigError(f"feature_dim must be positive, got {feature_dim}")
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


# ------------------------------------------------------------------------------------------------ the config


@dataclass
class CombinerNetConfig:
    """Sizes of the Combiner (``d`` comes from the CLIP checkpoint)."""

    projection_dim: int = cfg(0, "projection width p; 0 = 4·d (RN50x4: 2560)")
    hidden_dim: int = cfg(0, "fusion MLP width h; 0 = 8·d (RN50x4: 5120)")
    dropout: float = cfg(0.5, "dropout after every hidden layer (paper: 0.5)")


@dataclass
class CombinerModelConfig:
    """CLIP, the Combiner, which CLIP towers stage 1 tunes and which weights stage 2 starts from."""

    clip: TaskClipConfig = cfg(factory=TaskClipConfig, help="the CLIP model and its preprocessing")
    combiner: CombinerNetConfig = cfg(factory=CombinerNetConfig, help="Combiner sizes (stage 2)")
    encoder: Literal["text", "image", "both"] = cfg("text", "stage 1: which CLIP tower(s) to fine-tune")
    stage1_checkpoint: str | None = cfg(
        None,
        "stage 2: stage-1 checkpoint folder; 'auto' = <trainer.output_dir>/stage1/best; null = pretrained",
    )


@dataclass
class CombinerRecord:
    """What a ``combiner`` model folder records as its ``config``: the stage and the model section.

    The training config (:class:`capret.tasks.combiner.CombinerTaskConfig`) has the same two fields, so
    :func:`build_fuser` serves both.
    """

    stage: int = cfg(1, "1: CLIP fine-tuned, element-wise sum; 2: the Combiner on frozen CLIP")
    model: CombinerModelConfig = cfg(factory=CombinerModelConfig, help="CLIP and Combiner")


class _StagedModel(Protocol):
    @property
    def stage(self) -> int: ...

    @property
    def model(self) -> CombinerModelConfig: ...


def build_fuser(config: _StagedModel, feature_dim: int) -> nn.Module:
    """The fusion module of a stage, from the combiner registry: element-wise sum in stage 1, the Combiner in
    stage 2."""
    if config.stage == 1:
        return create_combiner("sum", feature_dim=feature_dim)
    net = config.model.combiner
    return create_combiner(
        "combiner",
        feature_dim=feature_dim,
        projection_dim=net.projection_dim or None,
        hidden_dim=net.hidden_dim or None,
        dropout=net.dropout,
    )


#: where each key of the flat pre-sections config (checkpoints written before the reorganisation) now lives
_FLAT_KEYS: dict[str, tuple[str, ...]] = {
    **same_name_in("data", "dataset", "root", "categories", "train_split", "val_split"),
    **same_name_in("model", "combiner", "encoder", "stage1_checkpoint"),
    **FLAT_CLIP_FEATURE_KEYS,
    "clip": ("model", "clip", "name"),
}


def upgrade_config_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """A combiner config dict in today's sectioned shape; flat dicts of older sidecars are moved into sections.

    Checkpoints written before every task shared the ``data/model/loss/trainer`` shape keep loading: their
    top-level keys are moved to the place :data:`_FLAT_KEYS` names. A dict already in today's shape is returned
    unchanged, so this is safe to call on any sidecar.
    """
    if not any(key in raw for key in _FLAT_KEYS):
        return raw
    out: dict[str, Any] = {k: v for k, v in raw.items() if k not in _FLAT_KEYS}
    move_flat_keys(raw, out, _FLAT_KEYS)
    return out
