"""Two training runs into one output folder: the second is refused at once, naming the first's PID, and the
folder holds only the first run's config and checkpoints (nothing moved to superseded/)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from capret.config import from_dict
from capret.engine.trainer import TrainerConfig, train
from capret.locks import OutputLockedError

RUN_A = """
import sys, time
from pathlib import Path
import torch
from torch import nn
from capret.config import from_dict
from capret.engine.trainer import TrainerConfig, train

torch.set_num_threads(1)
flag = Path(sys.argv[2])

class Slow:
    def build_model(self):
        return nn.Linear(3, 1)
    def train_dataloader(self, *, rank, world_size, epoch, seed):
        for _ in range(1000):
            yield {"x": torch.randn(4, 3)}
    def training_step(self, model, batch):
        flag.write_text("training")
        time.sleep(0.05)
        return {"loss": model(batch["x"]).pow(2).mean()}
    def evaluate(self, model):
        return {}

config = from_dict(TrainerConfig, {"output_dir": sys.argv[1], "max_steps": 40, "lr": 0.001, "save_every": 10,
                                   "keep_last": 0, "tensorboard": False, "progress": False})
train(Slow(), config)
"""


class _Never:
    """Run B's task: it must never get as far as building a model."""

    def build_model(self) -> None:
        pytest.fail("run B started although run A holds the folder")

    def train_dataloader(self, **_: object) -> list[object]:
        return []

    def training_step(self, *_: object) -> None:
        return None

    def evaluate(self, *_: object) -> dict[str, float]:
        return {}


def test_second_run_into_one_folder_is_refused_and_nothing_mixes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    flag = tmp_path / "a.flag"
    proc = subprocess.Popen([sys.executable, "-c", RUN_A, str(run), str(flag)])
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None, "run A exited early"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        config_b = from_dict(
            TrainerConfig,
            {"output_dir": str(run), "max_steps": 10, "lr": 0.005, "tensorboard": False, "progress": False},
        )
        start = time.monotonic()
        with pytest.raises(OutputLockedError) as info:
            train(_Never(), config_b)
        assert time.monotonic() - start < 5
        message = str(info.value)
        assert str(run) in message and f"PID {proc.pid}" in message and "\n" not in message
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
        proc.wait()
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["lr"] == 0.001  # A's config
    assert not (run / "superseded").exists()
    steps = sorted(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").iterdir())
    assert steps == [10, 20, 30, 40], steps


def test_capret_train_holds_the_folder_for_the_whole_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command locks trainer.output_dir before the task builds anything (exports and final metrics are
    written under the same hold), so a second command is refused without touching the folder."""
    from lock_holder import held_by_other_process
    from repo_paths import CONFIGS

    from capret.cli.train import main

    run = tmp_path / "run"
    argv = ["--config", str(CONFIGS / "demo_dualstream.yaml"), f"trainer.output_dir={run}"]
    argv += [f"data.root={tmp_path / 'no-data'}"]  # never read: the refusal comes first
    with held_by_other_process(run, what="training output folder") as pid:
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"PID {pid}" in err and str(run) in err and err.count("\n") == 1
    assert not run.exists()
