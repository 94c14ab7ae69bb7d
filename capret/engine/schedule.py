"""Optimizers and learning-rate schedules: linear warmup followed by cosine decay (or a constant rate).

The schedule is a pure function of the optimisation step, wrapped in ``LambdaLR``; since the lambda is a plain
function its state dict holds only integers and floats, so it checkpoints without pickle. The cosine form is the
one of SGDR (Loshchilov & Hutter, 2017) without restarts, as used by CLIP/open_clip and X-VLM.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from capret.errors import ConfigError

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "resolve_param_groups",
]

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adamw", "adam", "sgd")


def lr_factor(
    step: int,
    *,
    schedule: Literal["cosine", "constant"],
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier of the base learning rate for the update that follows ``step`` completed updates.

    Warmup ramps linearly from ``1/warmup_steps`` to 1 over the first ``warmup_steps`` updates (never 0, so the
    first update is not wasted); cosine then decays from 1 to ``min_lr_ratio`` at ``total_steps``.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    schedule: Literal["cosine", "constant"],
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to every parameter group's own base rate."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    if warmup_steps < 0 or total_steps < 1:
        raise ConfigError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")

    def factor(step: int) -> float:
        return lr_factor(
            step,
            schedule=schedule,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            min_lr_ratio=min_lr_ratio,
        )

    return LambdaLR(optimizer, factor)


def resolve_param_groups(
    model: nn.Module, groups: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Check a task's optimizer groups (or make one group of all trainable parameters) and name them.

    Every group gets a ``name`` (default ``group<i>``) used for its learning-rate column in the logs. A
    parameter listed twice is an error; trainable parameters in no group are reported because they would
    silently never change (e.g. an ArcFace head the task forgot to return).
    """
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    out = [dict(g) for g in groups]
    seen: set[int] = set()
    for i, group in enumerate(out):
        if "params" not in group:
            raise ValueError(f"param_groups()[{i}] has no 'params' key (keys: {sorted(group)})")
        group["params"] = list(group["params"])
        group.setdefault("name", f"group{i}")
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError(
                    f"param_groups(): a parameter appears twice (again in group {group['name']!r})"
                )
            seen.add(id(p))
    missing = sum(1 for p in model.parameters() if p.requires_grad and id(p) not in seen)
    if missing:
        logger.warning("%d trainable parameters are in no optimizer group and will not be updated", missing)
    return out


def build_optimizer(
    groups: list[dict[str, Any]],
    *,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """The torch optimizer ``name`` over ``groups``; the keyword values are defaults that a group may override."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay, momentum=momentum)
    raise ConfigError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
