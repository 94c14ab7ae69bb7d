"""The one training loop every task runs through, and nothing task-specific.

:mod:`.trainer` (``train(task, config)`` and the ``TrainTask`` protocol: AMP, accumulation, clipping, logging,
validation, best/last checkpoints, time budget, exact resume), :mod:`.checkpoint` (pickle-free safetensors +
JSON checkpoints), :mod:`.schedule` (optimizers, warmup + cosine), :mod:`.run_log` (CSV/TensorBoard logs of
rank 0) and :mod:`.distributed` (torchrun/DDP set-up that hands rank and world size to tasks as arguments).
Task definitions live in :mod:`capret.tasks`, model loading for inference in :mod:`capret.inference`.
"""
