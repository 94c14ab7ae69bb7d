"""Trainable tasks, one module each (``dualstream``, ``combiner``, ...), behind the task registry that
``capret-train`` dispatches to by the config's ``task`` key. A task builds its data, model and losses and hands
them to the one training loop in :mod:`capret.engine`."""

from capret.tasks.registry import TaskSpec, get_task, list_tasks, register_task

__all__ = ["TaskSpec", "get_task", "list_tasks", "register_task"]
