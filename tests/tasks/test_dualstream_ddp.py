"""Task ``dualstream`` under a two-process gloo DDP run (torchrun) matches the single-process run (issue 5, item 8).

Both runs see the same global batches: single process with P x K = 4 x 2 items per step, two ranks with 2 x 2
each (the P x K sampler hands batch ``r, r + 2, ...`` to rank ``r`` and consumes identities in the same order, so
rank 0's batch + rank 1's batch = the single-process batch). Augmentations and caption dropout draw from
per-sample seeds, so they do not depend on the rank; the visual encoder is a LayerNorm ViT (no per-rank
BatchNorm statistics) and the frozen caption encoder runs without dropout. Caption dropout leaves the ranks with
different numbers of captioned items (one rank with none in step 3), so the ITC gather handles unequal and empty
blocks. Equal per-term loss curves (ArcFace, ITC, box) and equal final weights (SGD with momentum, the separate
ArcFace parameter group, gradient clipping, one epoch boundary) show that DDP gradient averaging, the ITC gather
and the trainer's all-reduced logging are exact for this task.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dualstream_ddp_worker as _dualstream_ddp_worker  # noqa: E402
from tiny_text import build_tiny_bert, write_synthetic_df2  # noqa: E402

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "dualstream_ddp_worker.py"
STEPS = 3
LOCAL_P = 2
TERMS = ("loss", "arcface", "itc", "box")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log(run: Path) -> list[dict[str, float]]:
    with (run / "train_log.csv").open(newline="") as handle:
        return [{t: float(row[t]) for t in TERMS} for row in csv.DictReader(handle)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"))


def _config(root: Path) -> Path:
    stores = write_synthetic_df2(root / "data", identities={"train": 8}, user_views=2)
    bert = build_tiny_bert(root / "bert")
    config = {
        "task": "dualstream",
        "data": {
            "root": str(root / "data"),
            "val_split": "",
            "holdout_identities": 0.0,  # every identity trains: the DDP-vs-single comparison needs no selection
            "captions": str(stores["train"]),
            "k": 2,
            "caption_dropout": 0.5,
            "augment": True,
        },
        "model": {
            "visual": {"kind": "timm", "source": "test_vit", "image_size": 32},
            "text": {"kind": "hf_text", "source": str(bert), "max_length": 16, "freeze": True},
            "width": 32,
            "depth": 1,
            "heads": 2,
            "embed_dim": 32,
            "itc_dim": 16,
            "mode": "full",
        },
        "loss": {"itc_weight": 0.5, "box_weight": 0.5},
        "trainer": {
            "max_steps": STEPS,
            # SGD, not the default AdamW: Adam divides by sqrt(v), so on parameters whose true gradient is
            # zero (attention key biases: softmax is shift-invariant) the rounding noise of a different
            # reduction order becomes an lr-sized step (~7e-5 here) and weights cannot be compared; SGD maps
            # gradient differences linearly onto the weights. The loss terms match under AdamW as well.
            "optimizer": "sgd",
            "lr": 0.05,
            "clip_grad_norm": 1.0,
            "log_every": 1,
            "amp": "off",
            "device": "cpu",
            "progress": False,
            "tensorboard": False,
        },
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _captioned_per_rank(config: Path) -> list[list[int]]:
    """Captioned items per step (epochs 0 and 1) on each of the two ranks."""
    from capret.config import load_config
    from capret.tasks.dualstream import DualStreamConfig, DualStreamTask

    counts = []
    for rank in range(2):
        task = DualStreamTask(load_config(DualStreamConfig, config, [f"data.p={LOCAL_P}"]))
        task.build_model()
        counts.append(
            [
                int(batch["has_caption"].sum())
                for epoch in (0, 1)
                for batch in task.train_dataloader(rank=rank, world_size=2, epoch=epoch, seed=0)
            ][:STEPS]
        )
    return counts


@pytest.mark.usefixtures("one_thread")
def test_two_process_gloo_matches_single_process(tmp_path: Path) -> None:
    config = _config(tmp_path)
    counts = _captioned_per_rank(config)
    # the ITC gather sees unequal blocks, and an empty one
    assert any(a != b for a, b in zip(*counts)) and 0 in counts[0] + counts[1], counts
    single = tmp_path / "single"
    _dualstream_ddp_worker.main(str(config), str(single), 2 * LOCAL_P)

    ddp = tmp_path / "ddp"
    env = {
        k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"}
    }
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1] / "helpers")]
        ),
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command += [str(WORKER), str(config), str(ddp), str(LOCAL_P)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    want, got = _log(single), _log(ddp)
    assert len(want) == len(got) == STEPS
    for step, (a, b) in enumerate(zip(want, got), start=1):
        for term in TERMS:
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-6), (
                f"step {step} {term}: single {a[term]} vs ddp {b[term]}"
            )
    assert all(row["itc"] > 0 and row["box"] > 0 for row in want)  # every term is really on

    first, second = _weights(single), _weights(ddp)
    assert first.keys() == second.keys()
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # the run really trained: the final weights are not the common initialisation
    from capret.config import load_config
    from capret.engine.checkpoint import seed_everything
    from capret.tasks.dualstream import DualStreamConfig, DualStreamTask

    seed_everything(0)
    init = DualStreamTask(load_config(DualStreamConfig, config, [])).build_model().state_dict()
    assert not torch.allclose(init["model.head.weight"], second["model.head.weight"])
    assert not torch.allclose(init["arcface.W"], second["arcface.W"])
