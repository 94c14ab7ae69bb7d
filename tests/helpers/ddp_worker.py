"""A tiny ITC + regression task trained by ``capret.engine.trainer.train``; run under torchrun by test_ddp.py.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 tests/helpers/ddp_worker.py OUTPUT_DIR``. Every optimisation
step consumes one *global* batch of ``GLOBAL_BATCH`` pairs; rank ``r`` of ``W`` takes the ``r``-th contiguous
slice, so the gathered ITC matrix equals the single-process one and the runs must match. ITC only sees the
"captioned" rows, so ranks contribute unequal (sometimes zero) numbers of pairs to the gather.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from capret.config import from_dict
from capret.engine.distributed import DistContext, cleanup_distributed, init_distributed
from capret.engine.trainer import TrainerConfig, train
from capret.losses import ITCLoss

GLOBAL_BATCH = 8
STEPS = 6


class PairModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)
        self.head = nn.Linear(4, 1)
        self.itc = ITCLoss()

    def forward(
        self, image: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img = self.image(image)
        return img, self.text(text), self.head(img)


class PairTask:
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(7)
        self.image = torch.randn(48, 6, generator=gen)
        self.text = self.image[:, :5] + 0.3 * torch.randn(48, 5, generator=gen)
        self.target = self.image.sum(dim=1, keepdim=True)
        # like items without a caption: ITC only sees the captioned rows, so ranks hold different (even zero)
        # numbers of ITC pairs
        self.captioned = torch.rand(48, generator=gen) < 0.5
        self.rank, self.world_size = 0, 1

    def setup(self, dist: DistContext) -> None:
        self.rank, self.world_size = dist.rank, dist.world_size

    def build_model(self) -> nn.Module:
        return PairModel()

    def train_dataloader(self, *, rank: int, world_size: int, epoch: int, seed: int) -> list[dict[str, Any]]:
        order = torch.randperm(48, generator=torch.Generator().manual_seed(seed + epoch))
        local = GLOBAL_BATCH // world_size
        batches = []
        for start in range(0, 48, GLOBAL_BATCH):
            idx = order[start : start + GLOBAL_BATCH][rank * local : (rank + 1) * local]
            batches.append(
                {
                    "image": self.image[idx],
                    "text": self.text[idx],
                    "target": self.target[idx],
                    "captioned": self.captioned[idx],
                }
            )
        return batches

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        img, txt, pred = model(batch["image"], batch["text"])
        itc_module = model.module.itc if hasattr(model, "module") else model.itc
        keep = batch["captioned"]
        itc = itc_module(img[keep], txt[keep], rank=self.rank, world_size=self.world_size)
        mse = (pred - batch["target"]).pow(2).mean()
        return {"loss": itc["loss"] + mse, "itc": itc["loss"], "mse": mse, "temperature": itc["temperature"]}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {}


def config(output_dir: str) -> TrainerConfig:
    return from_dict(
        TrainerConfig,
        {
            "output_dir": output_dir,
            "max_steps": STEPS,
            "grad_accum": 2,
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 0.0,
            "warmup_steps": 2,
            "log_every": 1,
            "tensorboard": False,
            "progress": False,
            "device": "cpu",
        },
    )


class Crash(RuntimeError):
    pass


class CrashingPairTask(PairTask):
    """Every rank dies in the same micro-batch, like a job killed by the scheduler."""

    def __init__(self, crash_at: int) -> None:
        super().__init__()
        self.crash_at, self.seen = crash_at, 0

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.seen += 1
        if self.seen == self.crash_at:
            raise Crash("simulated kill")
        return super().training_step(model, batch)


def main(output_dir: str, resumed_dir: str | None = None) -> None:
    """Train into ``output_dir``; with ``resumed_dir`` also crash a second run after 4 steps and resume it."""
    torch.set_num_threads(1)
    # Several train() calls in one process share a process group created here (train() leaves a group it did
    # not create alone; re-creating the default group after destroying it is not supported under torchrun).
    ctx = init_distributed("cpu")
    try:
        train(PairTask(), config(output_dir))
        if resumed_dir is None:
            return
        crashing = config(resumed_dir)
        crashing.save_every = 2
        try:
            train(CrashingPairTask(crash_at=2 * 4 + 2), crashing)  # dies in step 5; last checkpoint: step 4
        except Crash:
            pass
        train(PairTask(), crashing, resume="auto")
    finally:
        cleanup_distributed(ctx)


if __name__ == "__main__":
    main(*sys.argv[1:])
