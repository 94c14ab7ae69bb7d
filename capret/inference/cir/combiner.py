"""Loading trained models of the CIR tasks for inference (the dual-stream loader is
:func:`capret.inference.dualstream.encoding.load_model`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from capret.config import ConfigError, from_dict
from capret.engine.checkpoint import load_model_weights
from capret.io import resolve_model_folder
from capret.models.clip import ClipBundle
from capret.tasks.combiner import CombinerTaskConfig, build_fuser, load_task_clip, upgrade_config_dict

__all__ = ["load_cir_model"]


def load_cir_model(
    checkpoint: Path, *, device: str | torch.device = "cpu"
) -> tuple[ClipBundle, nn.Module, CombinerTaskConfig]:
    """CLIP and fuser of a ``combiner`` checkpoint (or run folder: its ``best/``, else newest checkpoint),
    with the config its sidecar recorded.

    Sidecars written before the combiner config took the shared ``data/model/loss/trainer`` shape (flat
    ``root``, ``clip``, ...) are read through :func:`capret.tasks.combiner.upgrade_config_dict`, so older
    checkpoints keep loading.
    """
    checkpoint = resolve_model_folder(checkpoint)
    sidecar = json.loads((checkpoint / "checkpoint.json").read_text())
    task = (sidecar.get("config") or {}).get("task") or {}
    if task.get("task") != "combiner":
        raise ConfigError(
            f"{checkpoint}: sidecar task is {task.get('task')!r}; CIR evaluation needs a 'combiner' checkpoint"
        )
    config = from_dict(CombinerTaskConfig, upgrade_config_dict(task))
    if config.stage == 1:
        clip = load_task_clip(config, device=device)
        load_model_weights(clip, checkpoint, device=device)
        fuser = build_fuser(config, clip.feature_dim)
    else:
        clip = load_task_clip(config, device=device)  # pretrained or stage-1 weights, as in training
        fuser = build_fuser(config, clip.feature_dim)
        load_model_weights(fuser, checkpoint, device=device)
    return clip.eval(), fuser.to(device).eval(), config
