"""Every console script answers --help with exit code 0, and bad invocations fail with a one-line message."""

from __future__ import annotations

import importlib

import pytest

ENTRY_POINTS = {
    "capret": "capret.cli.main",
    "capret-caption": "captioning.cli",
    "capret-train": "capret.cli.train",
    "capret-eval": "capret.cli.eval",
    "capret-extract": "capret.cli.extract",
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_help_exits_zero(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(ENTRY_POINTS[name])
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_train_requires_config(capsys: pytest.CaptureFixture[str]) -> None:
    from capret.cli.train import main

    assert main([]) == 2
    assert "--config is required" in capsys.readouterr().err


def test_train_unknown_task(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from capret.cli.train import main

    path = tmp_path / "c.yaml"
    path.write_text("task: nosuchtask\n")
    assert main(["--config", str(path)]) == 2
    from capret.tasks.registry import list_tasks

    valid = ", ".join(list_tasks())  # every registered task, sorted (the clip task sorts first)
    assert f"unknown task 'nosuchtask'; valid names: {valid}" in capsys.readouterr().err


def test_eval_without_mode(capsys: pytest.CaptureFixture[str]) -> None:
    from capret.cli.eval import main

    assert main([]) == 2
    assert "choose a mode" in capsys.readouterr().err


def test_quickstart_unknown_stage(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from capret.cli.main import main

    assert main(["quickstart", "--out", str(tmp_path), "--stages", "nope"]) == 2
    assert "unknown quickstart stage 'nope'" in capsys.readouterr().err


def test_protocol_mode_rejects_rerank(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from capret.cli.eval import main

    args = [
        "--protocol",
        "deepfashion2",
        "--results",
        "r.json",
        "--query-gt",
        "q.json",
        "--gallery-gt",
        "g.json",
    ]
    assert main([*args, "--rerank", "aqe"]) == 2
    assert "--rerank needs features" in capsys.readouterr().err


def test_choice_lists_follow_the_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A newly registered task / caption backend / caption source / precision shows up in the CLIs."""
    from capret.cli import extract, train
    from capret.inference.dualstream import encoding as dualstream
    from capret.tasks.registry import _TASKS
    from captioning import cli as caption_cli
    from captioning.backends import base as backends
    from captioning.sources import _SOURCES

    monkeypatch.setitem(_TASKS._lazy, "newtask", "capret.tasks.newtask")
    assert "newtask" in train.build_parser().format_help()

    monkeypatch.setitem(backends._BACKENDS._entries, "newbackend", lambda **_: None)
    monkeypatch.setitem(_SOURCES._entries, "newsource", lambda *a, **k: [])
    caption_help = caption_cli.build_parser().format_help()
    assert "newbackend" in caption_help and "newsource" in caption_help

    monkeypatch.setattr(dualstream, "PRECISIONS", ("fp32", "fp8"))
    assert extract.build_parser().parse_args(
        ["--checkpoint", "m", "--images", "i", "--out", "o", "--precision", "fp8"]
    )
    with pytest.raises(SystemExit):
        extract.build_parser().parse_args(
            ["--checkpoint", "m", "--images", "i", "--out", "o", "--precision", "bf16"]
        )
