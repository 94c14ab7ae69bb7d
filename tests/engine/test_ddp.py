"""Two-process gloo DDP run (torchrun) matches the single-process run on the same global batches.

The task combines ITC (gathered across ranks with ``all_gather_with_grad``) and a regression term, uses gradient
accumulation (DDP ``no_sync``), SGD with momentum and warmup; equal loss curves *and* equal final weights show that
the gathered ITC gradient, DDP averaging and the logged all-reduced terms are all exact. The same torchrun job
also kills a second run after 4 steps and resumes it, which must reproduce the curve.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import ddp_worker as _ddp_worker  # noqa: E402
import pytest
import torch

from capret.engine.checkpoint import load_model_weights
from capret.engine.trainer import train

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "ddp_worker.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _losses(run: Path) -> list[tuple[float, float, float]]:
    with (run / "train_log.csv").open(newline="") as handle:
        return [(float(r["loss"]), float(r["itc"]), float(r["mse"])) for r in csv.DictReader(handle)]


def test_two_process_gloo_matches_single_process(tmp_path: Path) -> None:
    single = tmp_path / "single"
    train(_ddp_worker.PairTask(), _ddp_worker.config(str(single)))

    ddp, resumed = tmp_path / "ddp", tmp_path / "ddp_resumed"
    env = {
        k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"}
    }
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1] / "helpers")]
        ),
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(WORKER),
        str(ddp),
        str(resumed),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    want, got = _losses(single), _losses(ddp)
    assert len(want) == len(got) == _ddp_worker.STEPS
    for step, (a, b) in enumerate(zip(want, got), start=1):
        assert a == pytest.approx(b, abs=1e-5), f"step {step}: single {a} vs ddp {b}"
    # killed after step 4 and resumed under torchrun: the same curve again
    again = _losses(resumed)
    assert len(again) == _ddp_worker.STEPS
    for step, (a, b) in enumerate(zip(got, again), start=1):
        assert a == pytest.approx(b, abs=1e-6), f"step {step}: uninterrupted {a} vs resumed {b}"
    name = f"checkpoints/step_{_ddp_worker.STEPS:08d}"
    m1 = load_model_weights(_ddp_worker.PairModel(), single / name)
    m2 = load_model_weights(_ddp_worker.PairModel(), ddp / name)
    for (key, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(p1, p2, atol=1e-5, rtol=1e-5, msg=key)
    # the run really trained: weights moved away from the common initialisation
    torch.manual_seed(0)
    init = _ddp_worker.PairModel()
    assert not torch.allclose(init.image.weight, m2.image.weight)
