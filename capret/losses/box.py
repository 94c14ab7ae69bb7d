"""Box regression loss of text-conditioned localisation: L1 + (1 - GIoU), as in X-VLM and DETR.

X-VLM (Zeng et al., 2022, Sec. 3.3) predicts the box of the object a caption describes with an MLP on the fused
[CLS] feature followed by a sigmoid, i.e. normalised ``(cx, cy, w, h)`` in [0, 1], and trains it with
``L1 + (1 - GIoU)`` (Rezatofighi et al., 2019), each summed over boxes and divided by the number of boxes; the L1
term sums the four coordinates. GIoU uses ``torchvision.ops`` on corner boxes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from capret.errors import ConfigError

__all__ = ["BoxLoss", "box_loss"]


def box_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    l1_weight: float = 1.0,
    giou_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Weighted L1 + (1 - GIoU) between predicted and target ``(cx, cy, w, h)`` boxes in [0, 1].

    Args:
        pred, target: ``(n, 4)`` boxes.
        mask: optional ``(n,)`` bool; rows that are False (items without a box) do not count.
        l1_weight, giou_weight: weights of the two terms in ``loss``.

    Returns:
        ``loss`` (weighted sum), ``l1`` (per box, summed over coordinates), ``giou`` (mean 1 - GIoU).
    """
    if pred.dim() != 2 or pred.shape[-1] != 4 or pred.shape != target.shape:
        raise ValueError(
            f"box_loss needs (n, 4) cxcywh boxes of equal shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if mask is not None:
        if mask.shape != pred.shape[:1]:
            raise ValueError(f"box_loss mask must have shape ({pred.shape[0]},), got {tuple(mask.shape)}")
        pred, target = pred[mask.bool()], target[mask.bool()]
    pred, target = pred.float(), target.float()
    count = max(int(pred.shape[0]), 1)
    l1 = F.l1_loss(pred, target, reduction="sum") / count
    giou = (
        generalized_box_iou_loss(
            box_convert(pred, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy"), reduction="sum"
        )
        / count
    )
    return {"loss": l1_weight * l1 + giou_weight * giou, "l1": l1, "giou": giou}


class BoxLoss(nn.Module):
    """Module form of :func:`box_loss` with fixed weights (for configs and the loss registry)."""

    def __init__(self, *, l1_weight: float = 1.0, giou_weight: float = 1.0) -> None:
        super().__init__()
        if l1_weight < 0 or giou_weight < 0:
            raise ConfigError(f"BoxLoss weights must be >= 0, got l1={l1_weight}, giou={giou_weight}")
        self.l1_weight, self.giou_weight = l1_weight, giou_weight

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, *, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return box_loss(pred, target, mask=mask, l1_weight=self.l1_weight, giou_weight=self.giou_weight)

    def extra_repr(self) -> str:
        return f"l1_weight={self.l1_weight}, giou_weight={self.giou_weight}"
