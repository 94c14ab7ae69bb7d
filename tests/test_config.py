from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from capret.config import (
    ConfigError,
    cfg,
    config_help,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)
from capret.registry import Registry


@dataclass
class Optim:
    lr: float = cfg(1e-3, "learning rate")
    betas: tuple[float, float] = cfg((0.9, 0.999), "Adam betas")
    name: Literal["adam", "adamw"] = cfg("adamw", "optimizer")


@dataclass
class Experiment:
    task: str = cfg("demo", "task name")
    steps: int = cfg(10, "number of steps")
    ks: list[int] = cfg(factory=lambda: [1, 5], help="cut-offs")
    out: Path = cfg(Path("runs"), "output folder")
    clip: float | None = cfg(None, "gradient clipping (None: off)")
    optim: Optim = cfg(factory=Optim, help="optimizer section")


def test_defaults_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 0.01\n")
    config = load_config(Experiment, path, ["optim.name=adam", "ks=[1,10,20]", "clip=1", "out=/tmp/x"])
    assert config.steps == 20
    assert config.optim.lr == 0.01 and config.optim.name == "adam"
    assert config.ks == [1, 10, 20]
    assert config.clip == 1.0 and isinstance(config.clip, float)
    assert config.out == Path("/tmp/x")
    assert config.optim.betas == (0.9, 0.999)


def test_unknown_key_names_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config key optim.lrr.*valid keys: lr, betas, name"):
        load_config(Experiment, None, ["optim.lrr=1"])
    path = tmp_path / "bad.yaml"
    path.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*stepz.*valid keys: task, steps"):
        load_config(Experiment, path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steps=abc", "steps: expected an integer, got 'abc'"),
        ("steps=1.5", "steps: expected an integer"),
        ("optim.name=sgd", r"optim.name: 'sgd' is not one of \['adam', 'adamw'\]"),
        ("ks=3", "ks: expected a list"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("optim=3", "optim: expected a mapping"),
        ("noequals", "not of the form key=value"),
    ],
)
def test_wrong_types_are_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Experiment, None, [override])


def test_roundtrip_and_help(tmp_path: Path) -> None:
    config = load_config(Experiment, None, ["steps=7"])
    save_config(config, tmp_path / "c.yaml")
    assert load_config(Experiment, tmp_path / "c.yaml") == config
    assert to_dict(config)["out"] == "runs"
    keys = {row[0] for row in config_help(Experiment)}
    assert {"steps", "optim.lr", "optim.betas"} <= keys
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Experiment, "/nonexistent/x.yaml")


def test_registry() -> None:
    reg: Registry[int] = Registry("widget")

    @reg.register("one")
    def make_one() -> int:
        return 1

    assert reg.create("one") == 1
    assert reg.names() == ["one"] and "one" in reg
    with pytest.raises(KeyError, match="unknown widget 'two'; valid names: one"):
        reg.create("two")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("one")(make_one)


def test_yaml_scalars_are_yaml12_like(tmp_path: Path) -> None:
    @dataclass
    class Amp:
        lr: float = cfg(1.0, "learning rate")
        amp: Literal["auto", "off", "bf16"] = cfg("auto", "mixed precision")
        flag: bool = cfg(False, "a switch")

    config = load_config(Amp, None, ["lr=1e-3", "amp=off", "flag=true"])
    assert config.lr == 1e-3 and config.amp == "off" and config.flag is True
    path = tmp_path / "a.yaml"
    path.write_text("lr: 2e-5\namp: off\n")
    assert load_config(Amp, path).lr == 2e-5
    with pytest.raises(ConfigError, match="flag: expected true/false, got 'yes'"):
        load_config(Amp, None, ["flag=yes"])
