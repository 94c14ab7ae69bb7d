"""Image-text contrastive (ITC) loss: symmetric InfoNCE with a learnable temperature, identity-aware, DDP-aware.

As in CLIP (Radford et al., 2021) and X-VLM (Zeng et al., 2022, Sec. 3.2): the similarity of every image
embedding with every caption embedding of the (global) batch, divided by a temperature, is scored with
cross-entropy against the matching pair, in both directions, and the two directions are averaged. X-VLM
initialises the learnable temperature at 0.07 and clamps it to [0.001, 0.5] before each use; we do the same.

**Identity-aware targets.** A P x K retrieval batch holds K items of every identity (and the sampler repeats an
item when an identity has fewer than K), so "the matching pair only" would push an image away from the captions
of its own identity. X-VLM's retrieval fine-tuning passes instance ids instead: the target distribution of row
``i`` is ``(id_i == id_j) / #{j: id_j == id_i}`` over the global batch (soft multi-positive cross-entropy, both
directions). Same-identity rows, duplicates included, are therefore never negatives. Without ids every row is
its own identity, which is plain InfoNCE. Under DDP the ids are gathered with the embeddings.

Under DDP each rank scores its *local* rows against the columns gathered from all ranks
(``capret.losses.gather.all_gather_with_grad``, looked up at call time so tests can monkeypatch it, or any
``gather`` passed in). Rank, world size and process group are arguments, never globals. Because the gather's
backward sums gradients over ranks, DDP's gradient averaging yields exactly the gradient of the loss averaged
over the global batch (``tests/test_ddp.py``). Ranks may pass different numbers of rows (even none), but every
rank must call the loss, because it takes part in collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import capret.losses.gather as _dist

__all__ = ["ITCLoss", "itc_loss"]

#: gather(tensor, *, rank, world_size, group) -> concatenation over ranks along dim 0
GatherFn = Callable[..., torch.Tensor]


def itc_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    *,
    temperature: torch.Tensor | float,
    rank: int = 0,
    world_size: int = 1,
    group: Any = None,
    gather: GatherFn | None = None,
    normalize: bool = True,
    ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Symmetric (multi-positive) InfoNCE between the local rows and the global batch.

    Ranks may hold different numbers of rows (e.g. only captioned items), including none: every rank must still
    call this function, since it takes part in collectives. The local terms are scaled by
    ``local_rows * world_size / global_rows`` so that (a) their mean over ranks, which the trainer logs, is the
    loss of the whole global batch and (b) DDP's gradient averaging yields exactly that loss's gradient.

    Args:
        image_emb, text_emb: ``(n, d)`` local embeddings; row ``i`` of each is a matching pair.
        temperature: scalar dividing the cosine similarities (a tensor keeps its gradient).
        rank, world_size, group: this process's place in the job; ``world_size == 1`` needs no gather.
        gather: replaces ``all_gather_with_grad`` (tests simulate several ranks with it); called as
            ``gather(tensor, rank=, world_size=, group=, sizes=)``.
        normalize: L2-normalise the embeddings first (a no-op for encoders that already do).
        ids: ``(n,)`` integer identity of each local row; rows of equal id (across ranks too) are all positives,
            with equal shares of the target mass. ``None``: each row is its own identity.

    Returns:
        ``loss`` = (i2t + t2i) / 2, ``i2t`` (image -> caption cross-entropy), ``t2i``, and the detached
        ``temperature``.
    """
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"itc_loss needs image and text embeddings of the same (n, d) shape, got "
            f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if ids is not None and ids.shape != image_emb.shape[:1]:
        raise ValueError(f"itc_loss ids must have shape ({image_emb.shape[0]},), got {tuple(ids.shape)}")
    if normalize:
        image_emb = F.normalize(image_emb, dim=-1)
        text_emb = F.normalize(text_emb, dim=-1)
    n = image_emb.shape[0]
    temperature = torch.as_tensor(temperature, device=image_emb.device, dtype=image_emb.dtype)
    if world_size > 1:
        sizes = _dist.all_gather_sizes(n, world_size=world_size, device=image_emb.device, group=group)
        gather_fn = gather if gather is not None else _dist.all_gather_with_grad
        all_image = gather_fn(image_emb, rank=rank, world_size=world_size, group=group, sizes=sizes)
        all_text = gather_fn(text_emb, rank=rank, world_size=world_size, group=group, sizes=sizes)
        all_ids = (
            None
            if ids is None
            else _dist.all_gather_no_grad(ids, rank=rank, world_size=world_size, group=group, sizes=sizes)
        )
    else:
        sizes, all_image, all_text, all_ids = [n], image_emb, text_emb, ids
    total = sum(sizes)
    if all_image.shape[0] != total or all_text.shape[0] != total:
        raise ValueError(f"gather returned {all_image.shape[0]} rows, expected {total} (rank sizes {sizes})")
    if n == 0:
        # no local pairs: a zero that still depends on the gathered rows (their backward all-reduce must run on
        # every rank) and on the temperature (DDP expects a gradient for every parameter)
        zero = (all_image.sum() + all_text.sum()) * 0.0 + temperature * 0.0
        zero = zero.float()
        return {"loss": zero, "i2t": zero, "t2i": zero, "temperature": temperature.detach().float()}
    logits_i2t = image_emb @ all_text.t() / temperature
    logits_t2i = text_emb @ all_image.t() / temperature
    # cross-entropy in at least float32: under fp16/bf16 autocast the logits (up to 1/0.001) lose precision
    wide = torch.promote_types(logits_i2t.dtype, torch.float32)
    scale = n * world_size / total
    if all_ids is None:
        targets: torch.Tensor = torch.arange(n, device=image_emb.device) + sum(sizes[:rank])
    else:
        if all_ids.shape[0] != total:
            raise ValueError(f"gathered {all_ids.shape[0]} ids, expected {total} (rank sizes {sizes})")
        local_ids = all_ids[sum(sizes[:rank]) : sum(sizes[: rank + 1])].to(image_emb.device)
        same = (local_ids[:, None] == all_ids.to(image_emb.device)[None, :]).to(wide)
        targets = same / same.sum(dim=1, keepdim=True)  # each row holds at least itself
    i2t = F.cross_entropy(logits_i2t.to(wide), targets) * scale
    t2i = F.cross_entropy(logits_t2i.to(wide), targets) * scale
    return {"loss": (i2t + t2i) / 2, "i2t": i2t, "t2i": t2i, "temperature": temperature.detach().float()}


class ITCLoss(nn.Module):
    """ITC with the temperature as a parameter (put it in the model so the optimizer and checkpoints see it).

    Args:
        init_temperature: starting temperature (0.07 in CLIP and X-VLM).
        min_temperature, max_temperature: clamp applied before every use (X-VLM: 0.001 and 0.5).
        learnable: False keeps the temperature fixed (a buffer).
        rank, world_size, group: defaults for ``forward`` (a task that knows its place in the job at build time
            passes them here; ``forward`` arguments override them).
    """

    def __init__(
        self,
        *,
        init_temperature: float = 0.07,
        min_temperature: float = 0.001,
        max_temperature: float = 0.5,
        learnable: bool = True,
        rank: int = 0,
        world_size: int = 1,
        group: Any = None,
    ) -> None:
        super().__init__()
        self.rank, self.world_size, self.group = rank, world_size, group
        if not 0 < min_temperature <= init_temperature <= max_temperature:
            raise ValueError(
                "ITCLoss needs 0 < min_temperature <= init_temperature <= max_temperature, got "
                f"{min_temperature}, {init_temperature}, {max_temperature}"
            )
        self.min_temperature, self.max_temperature = min_temperature, max_temperature
        value = torch.tensor(float(init_temperature))
        if learnable:
            self.temperature = nn.Parameter(value)
        else:
            self.register_buffer("temperature", value)

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        group: Any = None,
        gather: GatherFn | None = None,
        ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            self.temperature.clamp_(self.min_temperature, self.max_temperature)
        return itc_loss(
            image_emb,
            text_emb,
            temperature=self.temperature,
            rank=self.rank if rank is None else rank,
            world_size=self.world_size if world_size is None else world_size,
            group=self.group if group is None else group,
            gather=gather,
            ids=ids,
        )

    def extra_repr(self) -> str:
        return f"temperature={float(self.temperature.detach()):.4g}, clamp=[{self.min_temperature}, {self.max_temperature}]"
