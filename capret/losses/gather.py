"""Differentiable all-gather of variable-length row blocks, for contrastive losses across DDP ranks.

It lives with the losses (not in :mod:`capret.engine`) so that losses never import the training loop: a loss
receives ``rank``, ``world_size`` and ``group`` as arguments and calls these module functions, which tests
monkeypatch to simulate several ranks in one process. Because the gather's backward sums gradients over
ranks, DDP's gradient averaging yields the gradient of the loss averaged over ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_no_grad", "all_gather_sizes", "all_gather_with_grad"]


def all_gather_sizes(rows: int, *, world_size: int, device: torch.device, group: Any = None) -> list[int]:
    """Every rank's row count (ranks may hold different numbers of rows, e.g. captioned items only)."""
    if world_size == 1:
        return [rows]
    local = torch.tensor([rows], dtype=torch.long, device=device)
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local, group=group)
    return [int(p.item()) for p in parts]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather of variable-length row blocks; backward sums the gradients of all ranks, keeps the local slice."""

    @staticmethod
    def forward(
        ctx: Any, tensor: torch.Tensor, rank: int, world_size: int, group: Any, sizes: list[int]
    ) -> torch.Tensor:
        ctx.group, ctx.offset, ctx.rows = group, sum(sizes[:rank]), tensor.shape[0]
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad.narrow(0, ctx.offset, ctx.rows), None, None, None, None


def all_gather_with_grad(
    tensor: torch.Tensor,
    *,
    rank: int,
    world_size: int,
    group: Any = None,
    sizes: list[int] | None = None,
) -> torch.Tensor:
    """Concatenate every rank's rows of ``tensor`` along dim 0, in rank order.

    Ranks may hold different numbers of rows (``sizes``, gathered first when not given; pass them when you also
    need them, as ITC does for its targets). Gradients flow back to the local slice and include every rank's use
    of it (see the module docstring). With ``world_size == 1`` the tensor is returned unchanged. This is a
    module-level function so that tests monkeypatch it to simulate several ranks in one process.
    """
    if world_size == 1:
        return tensor
    sizes = _rank_sizes(tensor, rank=rank, world_size=world_size, group=group, sizes=sizes)
    return _GatherWithGrad.apply(tensor, rank, world_size, group, sizes)


def _rank_sizes(
    tensor: torch.Tensor, *, rank: int, world_size: int, group: Any, sizes: list[int] | None
) -> list[int]:
    """Rows per rank: ``sizes`` checked against this rank's tensor, or gathered from every rank when None."""
    if sizes is None:
        sizes = all_gather_sizes(tensor.shape[0], world_size=world_size, device=tensor.device, group=group)
    if len(sizes) != world_size or sizes[rank] != tensor.shape[0]:
        raise ValueError(
            f"sizes {sizes} do not match world_size={world_size} and {tensor.shape[0]} local rows"
        )
    return list(sizes)


def all_gather_no_grad(
    tensor: torch.Tensor, *, rank: int, world_size: int, group: Any = None, sizes: list[int] | None = None
) -> torch.Tensor:
    """Concatenate every rank's rows of a tensor that needs no gradient (identity ids of ITC), in rank order."""
    if world_size == 1:
        return tensor
    sizes = _rank_sizes(tensor, rank=rank, world_size=world_size, group=group, sizes=sizes)
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)
