"""Device and torch.distributed plumbing for running any capret task under ``torchrun``.

``torchrun --nproc_per_node N -m capret.cli.train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address; :func:`init_distributed` turns them into a :class:`DistContext` (gloo on CPU, NCCL on GPUs).
Everything downstream receives the rank and world size from that context as arguments; no math reads them from
``torch.distributed`` globals (STYLE.md practice 6), so losses can be tested in one process by passing
``rank``/``world_size`` and a fake gather.

:func:`all_gather_with_grad` is the gather used by contrastive losses. Its backward all-reduces (sums) the
incoming gradient and returns the slice of the local rank. With every rank computing its local rows' loss
against the gathered columns, the gradient reaching rank ``r``'s embeddings is ``sum_s dL_s/de_r``; after DDP
averages parameter gradients over ranks, the update equals the single-process gradient of the mean loss over
the whole global batch (the "local loss + gather with grad" scheme of open_clip, shown exact in
``tests/test_ddp.py``). Ranks may hold different numbers of rows (e.g. only the captioned items of a batch):
the row counts are gathered first and blocks are padded to the longest for ``all_gather``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from capret.errors import ConfigError
from capret.io import default_device
from capret.locks import OutputLockedError, exclusive_output
from capret.losses.gather import all_gather_sizes, all_gather_with_grad  # noqa: F401  (re-exported)

__all__ = [
    "DistContext",
    "all_gather_object",
    "all_gather_sizes",
    "all_gather_with_grad",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_true",
    "barrier",
    "batch_size_of",
    "broadcast_flag",
    "cleanup_distributed",
    "exclusive_output_on_main",
    "init_distributed",
    "move_to_device",
    "resolve_amp_dtype",
    "unwrap_model",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. ``owns_group`` tells whether we created the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(device: str | None = None, *, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group described by torchrun's environment, or run single-process without one.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:K"``; None picks ``cuda:LOCAL_RANK`` when CUDA is available,
            else CPU. Under torchrun with CUDA each process takes the GPU of its local rank.
        timeout_s: collective timeout; a rank that dies leaves the others waiting this long at most.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")

    if device is None:
        resolved = default_device(local_rank=local_rank)
    else:
        resolved = torch.device(device)
        if resolved.type == "cuda" and resolved.index is None:
            resolved = torch.device(f"cuda:{local_rank if world_size > 1 else 0}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available; use device=cpu")
        torch.cuda.set_device(resolved)

    if world_size == 1:
        return DistContext(device=resolved)

    backend = "nccl" if resolved.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=_dt.timedelta(seconds=timeout_s),
            device_id=resolved if backend == "nccl" else None,
        )
        owns = True
    else:
        backend = dist.get_backend()
    logger.info("rank %d/%d on %s (%s)", rank, world_size, resolved, backend)
    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=resolved,
        backend=backend,
        owns_group=owns,
    )


def cleanup_distributed(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor, *, world_size: int, group: Any = None) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a new tensor; no gradient)."""
    if world_size == 1:
        return tensor.detach().clone()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out / world_size


def all_reduce_sum(tensor: torch.Tensor, *, world_size: int, group: Any = None) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a new tensor; no gradient)."""
    out = tensor.detach().clone()
    if world_size > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def broadcast_flag(flag: bool, *, device: torch.device, world_size: int, src: int = 0) -> bool:
    """Rank ``src``'s boolean, on every rank (stop decisions such as the time budget must agree)."""
    if world_size == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(value, src=src)
    return bool(value.item())


def all_true(flag: bool, *, device: torch.device, world_size: int) -> bool:
    """True only if ``flag`` is true on every rank (non-finite checks must stop all ranks together)."""
    if world_size == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def all_gather_object(obj: Any, *, world_size: int) -> list[Any]:
    """Every rank's ``obj`` (in-memory pickling between our own processes; used for RNG states)."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(*, world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Tensors inside (nested) dicts, lists and tuples moved to ``device``; other values unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(move_to_device(v, device) for v in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj


def batch_size_of(batch: Any) -> int:
    """Leading dimension of the first tensor in a batch (for throughput), 0 if there is none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else ()
    for value in values:
        size = batch_size_of(value)
        if size:
            return size
    return 0


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for the ``amp`` setting on ``device`` (None = full precision)."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise ConfigError(f"trainer.amp={amp!r} is not one of ['auto', 'bf16', 'fp16', 'off']")


@contextlib.contextmanager
def exclusive_output_on_main(
    path: str | os.PathLike[str], *, what: str, ctx: DistContext
) -> Iterator[Path | None]:
    """Rank 0 holds the one-writer lock on ``path`` (see :mod:`capret.locks`); every rank learns the outcome.

    Only rank 0 writes a run folder, so it alone takes the lock; the decision is broadcast before anyone goes
    on, so a refused job stops on every rank at once instead of leaving ranks waiting in a collective. Yields
    the lock file on rank 0, None elsewhere. Reentrant: a command that already holds the folder (capret-train
    around the whole task) nests this hold in the same thread.

    Raises:
        OutputLockedError: on every rank when rank 0 was refused (rank 0's message names the holder's PID).
    """
    with contextlib.ExitStack() as stack:
        refused: OutputLockedError | None = None
        lock_file: Path | None = None
        if ctx.is_main:
            try:
                lock_file = stack.enter_context(exclusive_output(path, what=what, reentrant=True))
            except OutputLockedError as exc:
                refused = exc
        if broadcast_flag(refused is not None, device=ctx.device, world_size=ctx.world_size):
            if refused is not None:
                raise refused
            raise OutputLockedError(
                f"{what} {path} is being written by another job (rank 0 of this job was refused)",
                path=Path(path),
            )
        yield lock_file
