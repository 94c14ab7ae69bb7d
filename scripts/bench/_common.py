"""What the dual-stream benchmarks share: the architectures they measure, their command line and the machine
fields that open their JSON.

``extract.py`` and ``train.py`` measure the same two models and ``catalogue.py`` ingests with the tiny one; keeping
the configurations here means a figure of one bench can be set beside another's knowing the model is the same.
The scripts run as ``python scripts/bench/NAME.py``, which puts this folder first on the import path, so they
import this module as ``_common``. It imports no ``captioning`` module: a script that then drops this folder from
the path (``scripts/bench/captioning.py`` would shadow that package) may import it first.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
from typing import Any

import torch

from capret.config import from_dict
from capret.models.dual_stream import DualStreamModelConfig, TextConfig, VisualConfig
from capret.quickstart.dual_stream import DEMO_RECIPE

#: A ViT-B/16-size visual stream with MiniLM captions (random weights: the speed is that of the pretrained one).
REAL = "real_vit_b16"
#: The quickstart's tiny model (ResNet-18 at 64 px, MiniLM captions, a narrow fusion), taken from its recipe so
#: the two cannot drift apart; in crop mode (the image is the item, no box head), as these benches measure it.
TINY = "tiny_resnet18_64px"

ARCHITECTURES: dict[str, DualStreamModelConfig] = {
    REAL: DualStreamModelConfig(
        visual=VisualConfig(source="vit_base_patch16_224", image_size=224),
        text=TextConfig(source="minilm", max_length=64),
        width=384,
        depth=3,
        heads=6,
        embed_dim=512,
    ),
    TINY: dataclasses.replace(from_dict(DualStreamModelConfig, DEMO_RECIPE["model"]), mode="crop"),
}


def architectures(*, skip_real: bool) -> dict[str, DualStreamModelConfig]:
    """The architectures a run measures: both, or only the tiny one under ``--skip-real``."""
    return {name: config for name, config in ARCHITECTURES.items() if not (skip_real and name == REAL)}


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the script's docstring, with ``--skip-real`` and
    ``--threads`` (read back by :func:`parse_bench_args`)."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--skip-real", action="store_true", help="only the tiny architecture")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return parser


def parse_bench_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line and apply ``--threads`` before anything is measured."""
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def machine(device: torch.device) -> dict[str, Any]:
    """What a figure was measured on: the GPU's name (or the CPU's), torch's threads and the CPU count."""
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
