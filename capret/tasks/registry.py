"""Registry of training tasks that ``capret-train`` dispatches to by the config's ``task`` key.

A task is registered with the dataclass of its config and a ``run(config, *, resume) -> dict`` function
returning final metrics. Task modules are imported lazily (the registry knows which module registers which
name) so that ``capret-train --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from capret.registry import Registry

__all__ = ["TaskSpec", "get_task", "list_tasks", "register_task"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config_cls: type
    run: Callable[..., dict[str, Any]]


_TASKS: Registry[TaskSpec] = Registry(
    "task",
    lazy_modules={
        "dualstream": "capret.tasks.dualstream",
        "detector": "capret.tasks.detector",
        "combiner": "capret.tasks.combiner",
        "phi": "capret.tasks.searle_phi",
        "pic2word": "capret.tasks.pic2word",
        "lincir": "capret.tasks.lincir",
        "clip": "capret.tasks.clip",
    },
)


def register_task(name: str, config_cls: type, run: Callable[..., dict[str, Any]]) -> None:
    spec = TaskSpec(name=name, config_cls=config_cls, run=run)
    _TASKS.register(name)(lambda: spec)


def list_tasks() -> list[str]:
    return _TASKS.names()


def get_task(name: str) -> TaskSpec:
    """The spec of task ``name``; an unknown name raises ``KeyError`` listing the valid tasks."""
    return _TASKS.create(name)
