"""Train, then export: the ``run()`` every task shares.

Each task's ``run(config, *, resume)`` checks the config is its own, trains with the shared loop
(:func:`capret.engine.trainer.train`), and on the main process writes a self-describing model folder
(``capret_model.json`` with the task's ``kind``: :mod:`capret.models.folder`) that :func:`capret.load` opens.
Only the export itself differs between tasks, so it is the one argument a task passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from torch import nn

from capret.config import ConfigError, cfg
from capret.engine.checkpoint import load_model_weights
from capret.engine.distributed import DistContext
from capret.engine.trainer import TrainerConfig, train

__all__ = ["ExportingTask", "SplitsConfig", "check_task_name", "selected_weights", "train_and_export"]

M = TypeVar("M", bound=nn.Module)

#: ``export(result, folder) -> extra``: write the model folder from the trainer's summary (``best_checkpoint`` is
#: the selected checkpoint when validation ran, else None and the task's in-memory model is the last one) and
#: return what the summary should add (e.g. the exported model's final metrics; ``{}`` if nothing)
Export = Callable[[dict[str, Any], Path], dict[str, Any]]


@dataclass
class SplitsConfig:
    """The first fields of the ``data`` section of every task that trains on a DeepFashion2-layout folder
    (``dualstream``, ``detector``): which folder, which split trains, which is scored after training (each task selects its checkpoints on
    a holdout of the train split instead)."""

    root: str = cfg(
        "data/deepfashion2", "dataset root in the DeepFashion2 layout (<root>/<split>/image, annos)"
    )
    train_split: str = cfg("train", "split to train on")
    val_split: str = cfg(
        "validation",
        "split scored once after training with the exported weights, never used for checkpoint selection; "
        "'' = none",
    )


class ExportingTask(Protocol):
    """What :func:`train_and_export` needs of a task besides the trainer's own protocol."""

    #: set by the trainer's ``setup`` call; only the main process writes the model folder
    dist: DistContext

    def config_dict(self) -> dict[str, Any]: ...


def check_task_name(config: Any, name: str) -> None:
    """A runner refuses a config of another task (``task: ...`` names which runner it is for)."""
    if config.task != name:
        raise ConfigError(f"task={config.task!r}: this runner trains task {name!r}")


def selected_weights(
    model: M, result: dict[str, Any], *, load: Callable[[M, str], Any] = load_model_weights
) -> M:
    """``model`` with the trainer's selected weights (``best_checkpoint``, when validation ran) loaded by
    ``load``; without validation the model keeps its last (in-memory) weights."""
    if result.get("best_checkpoint"):
        load(model, result["best_checkpoint"])
    return model


def train_and_export(
    task: ExportingTask,
    trainer: TrainerConfig,
    *,
    resume: str | None,
    export: Export,
    export_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train ``task``, then (main process only) export its model to ``export_dir`` (default
    ``<trainer.output_dir>/model``); the summary gains ``model_dir`` and what ``export`` returned."""
    result = train(task, trainer, resume=resume, task_config=task.config_dict())
    folder = Path(export_dir) if export_dir else Path(trainer.output_dir) / "model"
    if task.dist.is_main:
        extra = export(result, folder)
        result = {**result, "model_dir": str(folder), **extra}
    return result
