"""Progress bars: a time-budgeted training run is drawn against its budget, and one switch silences every bar."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from capret.progress import NO_PROGRESS_ENV, TrainingProgress, progress_enabled


def _bar(monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> tuple[TrainingProgress, io.StringIO]:
    monkeypatch.delenv(NO_PROGRESS_ENV, raising=False)
    out = io.StringIO()
    return TrainingProgress(file=out, **kwargs), out  # type: ignore[arg-type]


def test_a_budgeted_run_is_drawn_against_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    bar, out = _bar(monkeypatch, total_steps=100_000, max_seconds=1800.0)
    assert bar.bar.total == 1800.0  # the budget, not the step limit it will not reach
    bar.update(120, elapsed=600.0)
    bar.set_loss(0.25)
    assert bar.postfix() == "20:00 left, step 120 of at most 100000, loss=0.25"
    bar.update(121, elapsed=5000.0)  # past the budget: the bar stops at 100%, never beyond
    assert bar.bar.n == 1800.0 and bar.postfix().startswith("00:00 left")
    bar.close()
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in last and "of the 30:00 budget" in last and "step 121 of at most 100000" in last
    assert "/100000" not in out.getvalue() and "it/s" not in out.getvalue()


def test_a_step_limited_run_counts_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    bar, out = _bar(monkeypatch, total_steps=40, initial_step=10)
    assert bar.bar.total == 40 and bar.bar.n == 10
    bar.update(11, elapsed=1.0)
    bar.update(12, elapsed=2.0)
    bar.close()
    assert bar.bar.n == 12 and "12/40" in out.getvalue()


def test_the_environment_silences_every_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NO_PROGRESS_ENV, "1")
    assert not progress_enabled() and not progress_enabled(False)
    out = io.StringIO()
    bar = TrainingProgress(total_steps=5, max_seconds=10.0, file=out)
    bar.update(1, elapsed=1.0)
    bar.close()
    assert out.getvalue() == ""
    monkeypatch.setenv(NO_PROGRESS_ENV, "0")
    assert progress_enabled() and not progress_enabled(False)


@pytest.mark.parametrize(
    "argv",
    [
        ["ablate", "--config", "c.yaml", "--variants", "v.yaml", "--out", "o", "--no-progress"],
        ["index", "build", "--checkpoint", "m", "--images", "i", "--out", "o", "--no-progress"],
        ["oti", "--help"],
    ],
)
def test_long_capret_subcommands_take_no_progress(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from capret.cli.main import build_parser

    if argv[-1] == "--help":
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        out = capsys.readouterr().out
        assert "--no-progress" in out and NO_PROGRESS_ENV in out
        return
    assert build_parser().parse_args(argv).no_progress is True


def test_train_and_extract_take_no_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from capret.cli import extract, train

    monkeypatch.delenv(NO_PROGRESS_ENV, raising=False)
    assert (
        extract.build_parser()
        .parse_args(["--checkpoint", "m", "--images", "i", "--out", "o", "--no-progress"])
        .no_progress
    )
    config = Path(__file__).parents[1] / "configs" / "deepfashion2_dualstream.yaml"
    base = ["--config", str(config), "--print-config"]
    assert train.main(base) == 0
    assert json.loads(capsys.readouterr().out)["trainer"]["progress"] is True
    assert train.main([*base, "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["trainer"]["progress"] is False
    monkeypatch.setenv(NO_PROGRESS_ENV, "1")
    assert train.main(base) == 0
    assert json.loads(capsys.readouterr().out)["trainer"]["progress"] is False


def test_no_progress_also_silences_the_hugging_face_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    monkeypatch.delenv(NO_PROGRESS_ENV, raising=False)
    monkeypatch.setenv(
        "HF_HUB_DISABLE_PROGRESS_BARS", "0"
    )  # restored after the test, like the switches below
    try:
        transformers_logging.enable_progress_bar()
        enable_progress_bars()
        assert progress_enabled(True) and transformers_logging.is_progress_bar_enabled()
        assert progress_enabled(False) is False
        assert not transformers_logging.is_progress_bar_enabled()  # "Loading weights" of every model build
        assert are_progress_bars_disabled()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # for libraries imported later
    finally:
        transformers_logging.enable_progress_bar()
        enable_progress_bars()
