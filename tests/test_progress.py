"""Progress bars: a time-budgeted training run is drawn against its budget, and one switch silences every bar."""

from __future__ import annotations

import io

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
