"""Progress bars that tell the truth, and one switch that silences every one of them.

Every long command (training, captioning, extraction, index build, ablation, catalogue) shows a tqdm bar on
stderr. ``--no-progress`` on any of them, or ``CAPRET_NO_PROGRESS=1`` in the environment (for CI logs, cron jobs
and notebooks that run many commands), hides them all; results and errors are unchanged.

A training run that ends at a time budget (``trainer.max_seconds``) would otherwise show a bar of the step
limit it never reaches (``0/100000`` with an eight-hour ETA for a 30-minute budget): :class:`TrainingProgress`
draws such a run against its budget instead -- elapsed and remaining time, the step reached and the loss.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from tqdm.auto import tqdm

__all__ = [
    "NO_PROGRESS_ENV",
    "NO_PROGRESS_HELP",
    "TrainingProgress",
    "progress_enabled",
    "quiet_library_bars",
]

NO_PROGRESS_ENV = "CAPRET_NO_PROGRESS"
NO_PROGRESS_HELP = f"hide the progress bars (also: {NO_PROGRESS_ENV}=1)"
_TRUE = ("1", "true", "yes", "on")


def progress_enabled(requested: bool = True) -> bool:
    """Whether to draw progress bars: ``requested`` (False after ``--no-progress``) unless
    ``CAPRET_NO_PROGRESS`` is set to a true value, which wins so one variable silences a whole script.

    A False answer also silences the bars that libraries draw on their own (transformers' "Loading weights" when a
    text encoder is built, Hugging Face Hub transfers): otherwise ``--no-progress`` would still leave a bar per
    model load in a log (``capret ablate`` builds one per run)."""
    enabled = requested and os.environ.get(NO_PROGRESS_ENV, "").strip().lower() not in _TRUE
    if not enabled:
        quiet_library_bars()
    return enabled


def quiet_library_bars() -> None:
    """Hide the Hugging Face libraries' own progress bars for the rest of the process (and its child processes):
    through their switches when they are imported, and through ``HF_HUB_DISABLE_PROGRESS_BARS`` for a later
    import (transformers reads it when it is first imported). Never imports either library itself."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


class TrainingProgress:
    """The training loop's bar: steps when the run ends at a step count, time when it ends at a time budget.

    With ``max_seconds`` the bar's total is the budget in seconds and its position the seconds spent, so the
    percentage, the elapsed and the remaining time are those of the budget; the step reached and the loss ride
    in the postfix. A step limit that may still end the run earlier is named there too (``step 120 of at most
    100000``), never drawn as the bar's total.
    """

    def __init__(
        self,
        *,
        total_steps: int,
        initial_step: int = 0,
        max_seconds: float | None = None,
        enabled: bool = True,
        file: IO[str] | None = None,
    ) -> None:
        self.total_steps = total_steps
        self.max_seconds = max_seconds
        self.step = initial_step
        self._loss: float | None = None
        if max_seconds is None:
            self.bar = tqdm(
                total=total_steps,
                initial=initial_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                disable=not progress_enabled(enabled),
                file=file,
            )
        else:
            budget = tqdm.format_interval(max_seconds)
            self.bar = tqdm(
                total=max_seconds,
                desc="train",
                unit="s",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} of the "
                + budget
                + " budget{postfix}",
                dynamic_ncols=True,
                disable=not progress_enabled(enabled),
                file=file,
            )
            self.bar.set_postfix_str(self.postfix(), refresh=False)

    def update(self, step: int, *, elapsed: float) -> None:
        """Move to optimisation step ``step`` reached after ``elapsed`` seconds of this run."""
        self.step = step
        if self.max_seconds is None:
            self.bar.update(step - self.bar.n)
            return
        position = min(max(elapsed, 0.0), self.max_seconds)
        self.bar.set_postfix_str(self.postfix(position), refresh=False)
        self.bar.update(position - self.bar.n)  # tqdm rate-limits the writes itself

    def set_loss(self, loss: float) -> None:
        """Show the latest logged loss."""
        self._loss = loss
        if self.max_seconds is None:
            self.bar.set_postfix(loss=f"{loss:.4g}")
        else:
            self.bar.set_postfix_str(self.postfix(), refresh=False)

    def postfix(self, position: float | None = None) -> str:
        """What the budgeted bar shows after the time: the time left, the step and the loss."""
        parts = []
        if self.max_seconds is not None:
            spent = self.bar.n if position is None else position
            parts.append(f"{tqdm.format_interval(max(self.max_seconds - spent, 0.0))} left")
        parts.append(f"step {self.step} of at most {self.total_steps}")
        if self._loss is not None:
            parts.append(f"loss={self._loss:.4g}")
        return ", ".join(parts)

    def close(self) -> None:
        self.bar.close()
