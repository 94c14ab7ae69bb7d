"""Loss functions of capret and their registry.

Each loss returns a dict of named scalar terms with the total under ``"loss"``, so a task can merge them into its
``training_step`` output and the trainer logs every term. ArcFace comes from pytorch-metric-learning
(``pytorch_metric_learning.losses.ArcFaceLoss``) and is wired by the dual-stream task, not here.

``create_loss(name, **kwargs)`` builds a registered loss module; an unknown name lists the valid ones.
"""

from __future__ import annotations

from torch import nn

from capret.losses.box import BoxLoss, box_loss
from capret.losses.itc import ITCLoss, itc_loss
from capret.registry import Registry

__all__ = [
    "BoxLoss",
    "ITCLoss",
    "box_loss",
    "create_loss",
    "itc_loss",
    "list_losses",
    "register_loss",
]

_LOSSES: Registry[nn.Module] = Registry("loss")
register_loss, create_loss, list_losses = _LOSSES.functions()


register_loss("itc")(ITCLoss)
register_loss("box")(BoxLoss)
