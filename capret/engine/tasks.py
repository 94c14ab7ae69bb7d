"""Registry of training tasks that ``capret-train`` dispatches to by the config's ``task`` key.

A task is registered with the dataclass of its config and a ``run(config, *, resume) -> dict`` function
returning final metrics. Task modules are imported lazily so that ``capret-train --help`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["TaskSpec", "get_task", "list_tasks", "register_task"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config_cls: type
    run: Callable[..., dict[str, Any]]


_TASKS: dict[str, TaskSpec] = {}

#: task name -> module that registers it on import
_TASK_MODULES: dict[str, str] = {
    "dualstream": "capret.engine.dualstream_task",
    "combiner": "capret.engine.combiner_task",
}


def register_task(name: str, config_cls: type, run: Callable[..., dict[str, Any]]) -> None:
    if name in _TASKS:
        raise ValueError(f"task {name!r} is already registered")
    _TASKS[name] = TaskSpec(name=name, config_cls=config_cls, run=run)


def list_tasks() -> list[str]:
    return sorted(_TASK_MODULES)


def get_task(name: str) -> TaskSpec:
    if name not in _TASK_MODULES:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(list_tasks())}")
    if name not in _TASKS:
        importlib.import_module(_TASK_MODULES[name])
    return _TASKS[name]
