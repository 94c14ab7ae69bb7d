"""Pickle-free checkpoints: round trips, file formats, atomicity and bookkeeping."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from capret.engine.checkpoint import (
    CHECKPOINT_FILES,
    capture_rng_state,
    decode_state,
    encode_state,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from capret.engine.schedule import build_scheduler


class Tied(nn.Module):
    """Embedding and output layer share one weight (as in language models): safetensors rejects shared storage."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight
        self.norm = nn.BatchNorm1d(4)


def _trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(
        [
            {"params": [model.embed.weight], "name": "embed"},
            {"params": model.norm.parameters(), "lr": 1e-2, "name": "norm"},
        ],
        lr=1e-3,
    )
    sched = build_scheduler(opt, schedule="cosine", warmup_steps=2, total_steps=10)
    for _ in range(3):
        x = model.norm(model.embed(torch.randint(0, 10, (8,))))
        model.out(x).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def test_encode_decode_round_trip() -> None:
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 5: {"buf": torch.ones(1)}},
        "groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "params": [0, 5], "name": "a", "flag": None}],
        "numpy": ("MT19937", np.arange(5, dtype=np.uint32), 3, 0, 0.0),
        "python": (3, tuple(range(4)), None),
        "scalar": np.float32(1.5),
    }
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(state, tensors, prefix="x")
    decoded = decode_state(json.loads(json.dumps(encoded)), tensors)
    assert set(decoded["state"]) == {0, 5}
    torch.testing.assert_close(decoded["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert decoded["groups"][0]["betas"] == (0.9, 0.999)
    assert decoded["numpy"][1].dtype == np.uint32 and decoded["numpy"][1].tolist() == list(range(5))
    assert decoded["python"] == (3, (0, 1, 2, 3), None)
    assert decoded["scalar"] == 1.5
    with pytest.raises(TypeError, match=r"x\.bad: value of type object"):
        encode_state({"bad": object()}, {}, prefix="x")


def test_save_load_round_trip_without_pickle(tmp_path: Path) -> None:
    model, opt, sched = _trained()
    rng = capture_rng_state()
    path = save_checkpoint(
        tmp_path / "ck",
        model=model,
        optimizer=opt,
        scheduler=sched,
        step=3,
        epoch=1,
        rng_state={"ranks": [rng]},
        config={"trainer": {"lr": 1e-3}},
        metrics={"map": 0.5},
        trainer_state={"index": 7},
    )
    # only safetensors + JSON, every safetensors file opens with safe_open, every JSON parses
    assert sorted(p.name for p in path.iterdir()) == sorted(CHECKPOINT_FILES)
    for file in path.iterdir():
        assert file.suffix in {".safetensors", ".json"}
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                assert list(handle.keys())
        else:
            json.loads(file.read_text())
    sidecar = json.loads((path / "checkpoint.json").read_text())
    assert sidecar["step"] == 3 and sidecar["metrics"] == {"map": 0.5}
    assert sidecar["config"]["trainer"]["lr"] == 1e-3
    assert "torch" in sidecar["packages"] and "git_revision" in sidecar

    fresh, fresh_opt, fresh_sched = _trained(seed=1)
    loaded = load_checkpoint(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert (loaded.step, loaded.epoch, loaded.trainer_state["index"]) == (3, 1, 7)
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    assert fresh.out.weight is fresh.embed.weight  # tying survives loading
    want, got = opt.state_dict(), fresh_opt.state_dict()
    assert [g["name"] for g in got["param_groups"]] == ["embed", "norm"]
    assert got["param_groups"] == want["param_groups"]
    for idx, slots in want["state"].items():
        for name, value in slots.items():
            torch.testing.assert_close(got["state"][idx][name], value)
    assert fresh_sched.state_dict() == sched.state_dict()

    # RNG round trip: restoring the saved state reproduces the same draws
    restore_rng_state(loaded.rng_state["ranks"][0])
    draws = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(rng)
    assert draws[:2] == (random.random(), np.random.rand())
    torch.testing.assert_close(draws[2], torch.rand(3))


def test_load_model_weights_sources_and_errors(tmp_path: Path) -> None:
    model, _, _ = _trained()
    save_checkpoint(tmp_path / "ck", model=model, step=1, epoch=0)
    target = Tied()
    load_model_weights(target, tmp_path / "ck")
    torch.testing.assert_close(target.embed.weight, model.embed.weight)
    target2 = Tied()
    load_model_weights(target2, tmp_path / "ck" / "model.safetensors")
    torch.testing.assert_close(target2.norm.running_mean, model.norm.running_mean)

    (tmp_path / "weights.pt").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="no pickle"):
        load_model_weights(target, tmp_path / "weights.pt")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_model_weights(target, tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="checkpoint.json is missing"):
        load_checkpoint(tmp_path / "half", model=target)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_model_weights(nn.Linear(4, 4), tmp_path / "ck")
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(tmp_path / "ck", optimizer=torch.optim.SGD(target.parameters(), lr=0.1))


def test_latest_ignores_partial_and_prune(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    run = tmp_path / "run"
    for step in (5, 10, 15):
        save_checkpoint(run / "checkpoints" / f"step_{step:08d}", model=model, step=step, epoch=0)
    # an interrupted save: folder without the sidecar, and a temporary folder
    (run / "checkpoints" / "step_00000020").mkdir()
    (run / "checkpoints" / ".step_00000025.partial").mkdir()
    assert find_latest_checkpoint(run) == run / "checkpoints" / "step_00000015"
    removed = prune_checkpoints(run / "checkpoints", keep_last=2)
    assert [p.name for p in removed] == ["step_00000005"]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000010", "step_00000015"]
    assert prune_checkpoints(run / "checkpoints", keep_last=0) == []
    assert find_latest_checkpoint(tmp_path / "nothing") is None


def test_overwrite_replaces_folder(tmp_path: Path) -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    save_checkpoint(tmp_path / "ck", model=a, step=1, epoch=0)
    save_checkpoint(tmp_path / "ck", model=b, step=2, epoch=0)
    target = nn.Linear(2, 2)
    loaded = load_checkpoint(tmp_path / "ck", model=target)
    assert loaded.step == 2
    torch.testing.assert_close(target.weight, b.weight)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
