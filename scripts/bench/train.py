"""Training throughput of the dual-stream model (samples/s of full optimisation steps), real-size and tiny.

Each step is what ``capret-train`` runs: forward of both streams and the fusion, ArcFace + ITC + box losses,
backward, AdamW update (two parameter groups). Batches are synthetic tensors already in memory, so the figure
is the model's own cost (the data pipeline is measured by the quickstart's logged throughput). Architectures:
a ViT-B/16-size visual stream with MiniLM captions (random weights; same speed as pretrained) and the
quickstart's tiny one. Prints ONE JSON object.

    python scripts/bench/train.py [--steps 3] [--batch-size 16] [--skip-real]
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import REAL, TINY, architectures, bench_parser, machine, parse_bench_args  # noqa: E402

from capret.models.dual_stream import DualStreamModel, DualStreamModelConfig  # noqa: E402
from capret.tasks.dualstream import LossConfig, TrainModule  # noqa: E402

#: batch size on CPU (GPUs use --gpu-batch-size)
CPU_BATCH = {REAL: 8, TINY: 32}


def _batch(
    model: DualStreamModel, *, batch_size: int, num_classes: int, device: torch.device
) -> dict[str, Any]:
    size = model.data_config.image_size
    captions = [
        f"a red and blue striped short sleeve top with a round neckline, item {i}" for i in range(batch_size)
    ]
    tokens = model.tokenize(captions)
    batch = {
        "pixels": torch.randn(batch_size, 3, size, size),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "has_caption": torch.rand(batch_size) > 0.3,
        "label": torch.arange(batch_size) % num_classes,
        "box": torch.tensor([[0.5, 0.5, 0.6, 0.7]]).repeat(batch_size, 1),
    }
    return {k: v.to(device) for k, v in batch.items()}


def bench(
    config: DualStreamModelConfig, *, batch_size: int, steps: int, device: torch.device
) -> dict[str, Any]:
    torch.manual_seed(0)
    module = TrainModule(DualStreamModel(config), num_classes=max(2, batch_size // 4), loss=LossConfig()).to(
        device
    )
    head = list(module.arcface.parameters())
    rest = [p for p in module.parameters() if p.requires_grad and all(p is not h for h in head)]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": 1e-4}, {"params": head, "lr": 1e-2}])
    batch = _batch(module.model, batch_size=batch_size, num_classes=max(2, batch_size // 4), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        with autocast:
            terms = module(batch)
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(terms["loss"].detach())

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {
        "batch_size": batch_size,
        "image_size": module.model.data_config.image_size,
        "trainable_params_m": round(trainable / 1e6, 1),
        "seconds_per_step": round(seconds / steps, 3),
        "samples_per_s": round(batch_size * steps / seconds, 2),
        "loss_finite": bool(torch.isfinite(torch.tensor(loss))),
        "amp": "bf16" if device.type == "cuda" else "off",
    }


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    parser.add_argument("--gpu-batch-size", type=int, default=64, help="batch size on CUDA")
    args = parse_bench_args(parser)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {**machine(device), "steps": args.steps}
    for name, config in architectures(skip_real=args.skip_real).items():
        if name == REAL:  # the real-size run trains its caption encoder as well
            config = dataclasses.replace(config, text=dataclasses.replace(config.text, freeze=False))
        batch = args.gpu_batch_size if device.type == "cuda" else CPU_BATCH[name]
        out[name] = bench(config, batch_size=batch, steps=args.steps, device=device)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
