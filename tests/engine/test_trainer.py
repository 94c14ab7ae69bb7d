"""The shared training loop on a tiny regression task: learning, exact resume, NaN stop, best/validation, budget."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from capret.config import ConfigError, from_dict
from capret.engine.checkpoint import find_latest_checkpoint, load_checkpoint, load_model_weights
from capret.engine.schedule import lr_factor
from capret.engine.trainer import NonFiniteLossError, TrainerConfig, train


class RegressionTask:
    """Noisy linear regression; the model has dropout and the loss draws from the global RNG, so an exact
    resume needs every RNG restored, and the data order depends on (seed, epoch)."""

    def __init__(self, *, n: int = 48, batch: int = 4) -> None:
        gen = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 5, generator=gen)
        self.y = self.x @ torch.randn(5, 1, generator=gen) + 0.05 * torch.randn(n, 1, generator=gen)
        self.batch = batch
        self.steps_seen = 0
        self.eval_values: list[float] | None = None

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.1), nn.Linear(16, 1))

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [
            {"params": model[0].parameters(), "name": "body"},
            {"params": model[2].parameters(), "name": "head", "lr": 2e-2},
        ]

    def train_dataloader(self, *, rank: int, world_size: int, epoch: int, seed: int) -> Iterator[dict]:
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for start in range(0, len(order) - self.batch + 1, self.batch):
            idx = order[start : start + self.batch]
            yield {"x": self.x[idx], "y": self.y[idx], "note": "strings pass through"}

    def training_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        self.steps_seen += 1
        mse = (model(batch["x"]) - batch["y"]).pow(2).mean()
        jitter = 1e-3 * torch.rand(())  # consumes the torch RNG inside the step
        return {"loss": mse + jitter, "mse": mse}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        torch.rand(5)  # evaluation consuming RNG must not change training
        mse = float((model(self.x) - self.y).pow(2).mean().detach())
        if self.eval_values is not None:
            return {"score": self.eval_values.pop(0), "mse": mse}
        return {"mse": mse}

    def config_dict(self) -> dict[str, Any]:
        return {"n": len(self.x), "batch": self.batch}


class SizedRegressionTask(RegressionTask):
    """A loader with len() (epoch-based schedules need the number of batches per epoch)."""

    def train_dataloader(self, *, rank: int, world_size: int, epoch: int, seed: int) -> list[dict]:  # type: ignore[override]
        return list(super().train_dataloader(rank=rank, world_size=world_size, epoch=epoch, seed=seed))


class _NoisyData(torch.utils.data.Dataset):
    """Random augmentation drawn inside the worker processes (seeded by DataLoader from the global RNG)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i] + 0.1 * torch.randn(5), "y": self.y[i]}


class WorkerTask(RegressionTask):
    """A real DataLoader with worker processes and no generator of its own: worker seeds come from the global
    torch RNG when the epoch's iterator is created, which an exact resume must reproduce."""

    def train_dataloader(self, *, rank: int, world_size: int, epoch: int, seed: int) -> Any:  # type: ignore[override]
        order = torch.randperm(
            len(self.x), generator=torch.Generator().manual_seed(seed * 1000 + epoch)
        ).tolist()
        return torch.utils.data.DataLoader(
            _NoisyData(self.x, self.y), batch_size=self.batch, sampler=order, num_workers=2, drop_last=True
        )


class CrashingWorkerTask(WorkerTask):
    def training_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        if self.steps_seen + 1 == 3 * 6 + 2:
            raise Crash("simulated kill")
        return super().training_step(model, batch)


class Crash(RuntimeError):
    pass


class CrashingTask(RegressionTask):
    """Dies (like a killed job) at the given micro-batch."""

    def __init__(self, crash_at: int) -> None:
        super().__init__()
        self.crash_at = crash_at

    def training_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        if self.steps_seen + 1 == self.crash_at:
            raise Crash("simulated kill")
        return super().training_step(model, batch)


class NaNTask(RegressionTask):
    def __init__(self, nan_at: int) -> None:
        super().__init__()
        self.nan_at = nan_at

    def training_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        terms = super().training_step(model, batch)
        if self.steps_seen == self.nan_at:
            terms["mse"] = terms["mse"] * float("nan")
            terms["loss"] = terms["mse"] + 1.0
        return terms


def _config(out: Path, **overrides: Any) -> TrainerConfig:
    base: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": 12,
        "grad_accum": 3,
        "lr": 1e-2,
        "warmup_steps": 3,
        "schedule": "cosine",
        "clip_grad_norm": 5.0,
        "log_every": 1,
        "save_every": 4,
        "keep_last": 0,
        "tensorboard": False,
        "progress": False,
    }
    base.update(overrides)
    return from_dict(TrainerConfig, base)


def _log(run: Path, name: str = "train_log.csv") -> list[dict[str, str]]:
    with (run / name).open(newline="") as handle:
        return list(csv.DictReader(handle))


def _losses(run: Path) -> list[tuple[int, float, float]]:
    return [(int(r["step"]), float(r["loss"]), float(r["mse"])) for r in _log(run)]


def test_tiny_task_learns_and_writes_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(RegressionTask(), _config(run, max_steps=30, tensorboard=True, eval_every=10))
    losses = [loss for _, loss, _ in _losses(run)]
    assert result["steps"] == 30 and result["stop_reason"] == "max_steps"
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert result["final"]["loss"] == pytest.approx(losses[-1])
    row = _log(run)[0]
    assert {"grad_norm", "lr/body", "lr/head", "samples_per_s", "steps_per_s", "epoch"} <= set(row)
    # group lrs follow warmup: head has its own base rate
    assert float(row["lr/head"]) == pytest.approx(
        2e-2 * lr_factor(0, schedule="cosine", warmup_steps=3, total_steps=30)
    )
    assert float(row["lr/body"]) == pytest.approx(
        1e-2 * lr_factor(0, schedule="cosine", warmup_steps=3, total_steps=30)
    )
    assert [int(r["step"]) for r in _log(run, "eval_log.csv")] == [10, 20, 30]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((run / "checkpoints" / "step_00000030" / "checkpoint.json").read_text())
    assert saved["config"]["task"] == {"n": 48, "batch": 4}
    assert saved["config"]["trainer"]["grad_accum"] == 3
    assert (run / "config.yaml").is_file()
    assert result["last_checkpoint"] == str(run / "checkpoints" / "step_00000030")
    # the model trained here loads into a fresh one and reproduces the saved metric
    fresh = load_model_weights(RegressionTask().build_model(), result["last_checkpoint"]).eval()
    task = RegressionTask()
    assert task.evaluate(fresh)["mse"] == pytest.approx(result["metrics"]["mse"], rel=1e-6)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    """N steps uninterrupted == killed after ~N/2 + resume, with accumulation, warmup+cosine, dropout, RNG."""
    full = tmp_path / "full"
    train(RegressionTask(), _config(full))
    reference = _losses(full)
    assert len(reference) == 12

    broken = tmp_path / "broken"
    with pytest.raises(Crash):
        train(
            CrashingTask(crash_at=3 * 6 + 2), _config(broken)
        )  # dies inside step 7; last checkpoint: step 4
    assert find_latest_checkpoint(broken) == broken / "checkpoints" / "step_00000004"
    assert len(_losses(broken)) == 6
    result = train(RegressionTask(), _config(broken), resume="auto")
    assert result["steps"] == 12
    resumed = _losses(broken)
    assert [s for s, _, _ in resumed] == list(range(1, 13))
    for (step, a, m), (_, b, n) in zip(reference, resumed):
        assert a == pytest.approx(b, abs=1e-6), f"loss differs at step {step}"
        assert m == pytest.approx(n, abs=1e-6)
    a_state = load_checkpoint(full / "checkpoints" / "step_00000012").sidecar
    b_state = load_checkpoint(broken / "checkpoints" / "step_00000012").sidecar
    assert a_state["metrics"] == pytest.approx(b_state["metrics"])
    # an explicit checkpoint folder (of another run) continues the same curve in a new run folder
    fork = tmp_path / "fork"
    train(RegressionTask(), _config(fork), resume=str(full / "checkpoints" / "step_00000004"))
    forked = _losses(fork)
    assert [s for s, _, _ in forked] == list(range(5, 13))
    for (step, a, _), (_, b, _) in zip(reference[4:], forked):
        assert a == pytest.approx(b, abs=1e-6), f"loss differs at step {step}"


def test_resume_exact_with_dataloader_workers(tmp_path: Path) -> None:
    full, broken = tmp_path / "full", tmp_path / "broken"
    train(WorkerTask(), _config(full, max_steps=8, save_every=3))
    with pytest.raises(Crash):  # dies in step 7; the last checkpoint (step 6) sits in the middle of epoch 1
        train(CrashingWorkerTask(), _config(broken, max_steps=8, save_every=3))
    assert find_latest_checkpoint(broken) == broken / "checkpoints" / "step_00000006"
    train(WorkerTask(), _config(broken, max_steps=8, save_every=3), resume="auto")
    reference, resumed = _losses(full), _losses(broken)
    assert [s for s, _, _ in resumed] == list(range(1, 9))
    for (step, a, _), (_, b, _) in zip(reference, resumed):
        assert a == pytest.approx(b, abs=1e-6), f"loss differs at step {step}"


def test_resume_auto_without_checkpoint_starts_fresh_and_bad_path_fails(tmp_path: Path) -> None:
    result = train(RegressionTask(), _config(tmp_path / "new", max_steps=2), resume="auto")
    assert result["steps"] == 2
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        train(RegressionTask(), _config(tmp_path / "x", max_steps=2), resume=str(tmp_path / "nowhere"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    task = NaNTask(nan_at=3 * 5 + 2)  # second micro-batch of step 6
    with pytest.raises(NonFiniteLossError) as info:
        train(task, _config(run, save_every=0))
    err = info.value
    assert err.step == 6 and sorted(err.terms) == ["loss", "mse"]
    assert "mse" in str(err) and "step 6" in str(err) and "step 5" in str(err)
    assert err.checkpoint == run / "checkpoints" / "step_00000005"
    model = RegressionTask().build_model()
    loaded = load_checkpoint(err.checkpoint, model=model)
    assert loaded.step == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the last good checkpoint resumes exactly: same curve as a clean run up to the point of failure
    clean = tmp_path / "clean"
    train(RegressionTask(), _config(clean, max_steps=12))
    train(RegressionTask(), _config(run, save_every=0), resume="auto")
    for (_, a, _), (_, b, _) in zip(_losses(clean), _losses(run)):
        assert a == pytest.approx(b, abs=1e-6)


def test_fresh_run_moves_previous_outputs_aside(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(RegressionTask(), _config(run, max_steps=8))
    train(RegressionTask(), _config(run, max_steps=2, save_every=0))
    # the old step-8 checkpoint must not be what resume="auto" finds next to the new run's step 2
    assert find_latest_checkpoint(run) == run / "checkpoints" / "step_00000002"
    (old,) = (run / "superseded").iterdir()
    assert (old / "checkpoints" / "step_00000008" / "checkpoint.json").is_file()
    assert len(_losses(old)) == 8 and len(_losses(run)) == 2


def test_non_finite_at_first_step_reports_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match="no update had completed") as info:
        train(NaNTask(nan_at=1), _config(tmp_path / "run"))
    assert info.value.checkpoint is None and info.value.step == 1


def test_best_checkpoint_follows_monitor(tmp_path: Path) -> None:
    task = RegressionTask()
    task.eval_values = [0.3, 0.7, 0.5, 0.6]
    run = tmp_path / "run"
    result = train(task, _config(run, eval_every=3, monitor="score", monitor_mode="max"))
    assert result["best"] == 0.7 and result["best_step"] == 6
    assert load_checkpoint(run / "best").step == 6
    task = RegressionTask()
    task.eval_values = [0.3, 0.7, 0.1, 0.6]
    result = train(task, _config(tmp_path / "min", eval_every=3, monitor="score", monitor_mode="min"))
    assert result["best_step"] == 9


def test_evaluation_does_not_change_training(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    train(RegressionTask(), _config(a, eval_every=1, max_steps=6))
    train(RegressionTask(), _config(b, eval_every=0, max_steps=6))
    assert _losses(a) == _losses(b)


def test_epochs_budget_and_amp(tmp_path: Path) -> None:
    # 48 samples / batch 4 = 12 micro-batches per epoch; 2 epochs with accumulation 3 -> 8 steps
    result = train(SizedRegressionTask(), _config(tmp_path / "ep", max_steps=None, epochs=2, save_every=0))
    assert result["steps"] == 8 and result["epoch"] == 1
    result = train(RegressionTask(), _config(tmp_path / "budget", max_seconds=0.0, save_every=0))
    assert result["steps"] == 1 and result["stop_reason"] == "max_seconds"
    assert (tmp_path / "budget" / "checkpoints" / "step_00000001" / "checkpoint.json").is_file()
    result = train(RegressionTask(), _config(tmp_path / "bf16", amp="bf16", max_steps=3, save_every=0))
    assert result["steps"] == 3 and torch.isfinite(torch.tensor(result["final"]["loss"]))
    # fp16 uses a GradScaler (overflowing steps are skipped, not fatal); its scale is logged and checkpointed
    fp16 = tmp_path / "fp16"
    result = train(RegressionTask(), _config(fp16, amp="fp16", max_steps=4, save_every=2))
    assert result["steps"] == 4 and "amp_scale" in _log(fp16)[0]
    scale = float(_log(fp16)[1]["amp_scale"])
    state = json.loads((fp16 / "checkpoints" / "step_00000002" / "training_state.json").read_text())
    assert state["scaler"]["scale"] == scale


def test_lr_factor_shape() -> None:
    kw: dict[str, Any] = {"schedule": "cosine", "warmup_steps": 4, "total_steps": 14}
    assert [lr_factor(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, **kw) == pytest.approx(0.5)
    assert lr_factor(14, **kw) == pytest.approx(0.0)
    assert lr_factor(14, **kw, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(100, schedule="constant", warmup_steps=0, total_steps=5) == 1.0
    with pytest.raises(ValueError, match="valid schedules: cosine, constant"):
        lr_factor(0, schedule="linear", warmup_steps=0, total_steps=5)  # type: ignore[arg-type]


def test_bad_settings_fail_early(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(TrainerConfig, {"optimizer": "lamb"})
    with pytest.raises(ValueError, match="needs a train_dataloader with len"):
        train(RegressionTask(), _config(tmp_path, max_steps=None, epochs=1))
    with pytest.raises(ValueError, match="max_steps or epochs"):
        train(RegressionTask(), _config(tmp_path, max_steps=None))
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        train(RegressionTask(), _config(tmp_path, grad_accum=0))

    class NoLoss(RegressionTask):
        def training_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
            return {"mse": super().training_step(model, batch)["mse"]}

    with pytest.raises(ValueError, match="'loss' entry, got \\['mse'\\]"):
        train(NoLoss(), _config(tmp_path / "noloss"))

    class Empty(RegressionTask):
        def train_dataloader(self, **_: Any) -> list:
            return []

    with pytest.raises(ValueError, match="yielded no batches"):
        train(Empty(), _config(tmp_path / "empty"))


def test_resume_auto_skips_a_corrupt_newest_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated newest checkpoint (full disk, kill during a copy) is skipped, saying which and why; the run
    resumes from the newest intact one and still reproduces the uninterrupted curve."""
    from capret.engine.checkpoint import newest_intact_checkpoint
    from capret.errors import CheckpointError

    full = tmp_path / "full"
    train(RegressionTask(), _config(full))
    reference = _losses(full)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(CrashingTask(crash_at=3 * 10 + 2), _config(run))  # last checkpoint: step 8
    newest = run / "checkpoints" / "step_00000008"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated
    found, skipped = newest_intact_checkpoint(run)
    assert found == run / "checkpoints" / "step_00000004" and skipped[0][0] == newest
    with pytest.raises(CheckpointError, match="model.safetensors.*checksum"):
        load_checkpoint(newest)
    result = train(RegressionTask(), _config(run), resume="auto")
    err = capsys.readouterr().err
    assert "skipped checkpoint step_00000008" in err and "checksum" in err
    assert result["steps"] == 12
    resumed = {s: a for s, a, _ in _losses(run)}
    for step, loss, _ in reference:
        assert resumed[step] == pytest.approx(loss, abs=1e-6)


def test_shape_mismatch_names_tensor_and_config_keys(tmp_path: Path) -> None:
    from capret.errors import CheckpointError

    result = train(RegressionTask(), _config(tmp_path / "run", max_steps=4))
    wider = nn.Sequential(nn.Linear(5, 32), nn.Dropout(0.1), nn.Linear(32, 1))
    saved = json.loads((Path(result["last_checkpoint"]) / "checkpoint.json").read_text())["config"]
    changed = {**saved, "task": {**saved["task"], "hidden": 32}}
    with pytest.raises(
        CheckpointError, match=r"shape mismatch: 0\.bias \[16\].*\[32\].*task\.hidden: None -> 32"
    ):
        load_model_weights(wider, result["last_checkpoint"], config=changed)


def test_time_budgeted_training_shows_its_budget_not_the_step_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CAPRET_NO_PROGRESS", raising=False)
    config = _config(tmp_path / "run", max_steps=100_000, max_seconds=0.0, save_every=0, progress=True)
    assert train(RegressionTask(), config)["stop_reason"] == "max_seconds"
    err = capsys.readouterr().err
    assert "of the 00:00 budget" in err and "step 1 of at most 100000" in err
    assert "/100000" not in err  # no step total the run never reaches, no ETA computed from it
