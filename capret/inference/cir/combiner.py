"""The trained CLIP4Cir model at inference: its folder (kind ``combiner``), its loader, and its CLIP.

A ``combiner`` model folder (written by :func:`save_combiner_folder` after ``capret-train`` task ``combiner``)::

    capret_model.json   {"kind": "combiner", "format": "capret.combiner/1",
                         "config": {"stage": 1|2, "model": {clip, combiner, encoder, stage1_checkpoint}}}
    clip.safetensors    the CLIP's weights when they are not the named pretrained ones (stage 1 always; stage 2
                        when it started from stage 1), so the folder needs no run folder beside it
    fuser.safetensors   the Combiner (stage 2; stage 1's element-wise sum has no weights)

Training checkpoints (``<run>/stage<N>/best``, ``checkpoints/step_*``) still load: they are rebuilt from the task
config their sidecar recorded, flat pre-sections sidecars included (:func:`capret.models.combiner.
upgrade_config_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capret.config import from_dict, to_dict
from capret.engine.checkpoint import load_model_weights
from capret.errors import MissingFileError
from capret.inference.model_kinds import load, register_model_kind
from capret.io import default_device, file_sha256, read_json
from capret.models.clip import ClipBundle, load_task_clip_config
from capret.models.combiner import CombinerModelConfig, CombinerRecord, build_fuser, upgrade_config_dict
from capret.models.folder import (
    MODEL_CONFIG_FILE,
    read_model_config,
    read_weights,
    write_model_config,
    write_weights,
)

__all__ = [
    "COMBINER_FORMAT",
    "CombinerModel",
    "load_cir_model",
    "load_combiner_clip",
    "resolve_stage1_checkpoint",
    "save_combiner_folder",
]

COMBINER_FORMAT = "capret.combiner/1"
_CLIP_FILE = "clip.safetensors"
_FUSER_FILE = "fuser.safetensors"


@dataclass
class CombinerModel:
    """CLIP and the fuser of a trained ``combiner`` model, with what its folder records."""

    clip: ClipBundle
    fuser: nn.Module
    config: CombinerRecord
    folder: Path

    @property
    def stage(self) -> int:
        return self.config.stage

    def describe(self) -> dict[str, Any]:
        """What an output records about the model."""
        return {
            "kind": "combiner",
            "folder": str(self.folder),
            "stage": self.stage,
            "clip": to_dict(self.config.model.clip),
        }


def resolve_stage1_checkpoint(model: CombinerModelConfig, *, output_dir: str | Path) -> Path | None:
    """The stage-1 checkpoint folder a stage-2 model starts from (None = pretrained CLIP)."""
    value = model.stage1_checkpoint
    if value is None:
        return None
    path = Path(output_dir) / "stage1" / "best" if value == "auto" else Path(value)
    if not (path / "checkpoint.json").is_file() and not (path / MODEL_CONFIG_FILE).is_file():
        raise MissingFileError(
            f"model.stage1_checkpoint={value!r}: {path} is not a checkpoint or model folder "
            "(train stage 1 first, or set model.stage1_checkpoint=null to start from the pretrained CLIP)",
            path=path,
        )
    return path


def load_combiner_clip(
    config: CombinerRecord | Any, *, output_dir: str | Path, device: str | torch.device = "cpu"
) -> ClipBundle:
    """CLIP with the config's preprocessing; in stage 2, with the stage-1 fine-tuned weights loaded (from a
    training checkpoint or a stage-1 model folder)."""
    clip = load_task_clip_config(config.model.clip, device=device)
    stage1 = resolve_stage1_checkpoint(config.model, output_dir=output_dir) if config.stage == 2 else None
    if stage1 is not None:
        if (stage1 / MODEL_CONFIG_FILE).is_file():
            read_weights(clip, stage1 / _CLIP_FILE, device=device)
        else:
            load_model_weights(clip, stage1, device=device)
    return clip


def save_combiner_folder(
    folder: str | Path,
    *,
    clip: ClipBundle,
    fuser: nn.Module,
    config: CombinerRecord,
    clip_trained: bool,
    trained_from: dict[str, Any] | None = None,
) -> Path:
    """Write a ``combiner`` model folder. ``clip_trained``: the CLIP's weights differ from the named pretrained
    ones (stage 1, or stage 2 started from stage 1), so they are written beside the fuser."""
    folder = Path(folder)
    # the folder holds every weight it needs: it never points back at a run folder
    record = CombinerRecord(stage=config.stage, model=replace(config.model, stage1_checkpoint=None))
    written: dict[str, nn.Module] = {}
    if clip_trained:
        written[_CLIP_FILE] = clip
    if config.stage == 2:
        written[_FUSER_FILE] = fuser
    sha256 = {
        name: file_sha256(write_weights(folder / name, module, format=COMBINER_FORMAT))
        for name, module in written.items()
    }
    extra = {"trained_from": trained_from} if trained_from is not None else {}
    write_model_config(
        folder, kind="combiner", format=COMBINER_FORMAT, config=to_dict(record), sha256=sha256, **extra
    )
    return folder


@register_model_kind("combiner")
def _load_combiner(folder: Path, *, device: str | torch.device | None = None) -> CombinerModel:
    target = default_device(device)
    if (folder / MODEL_CONFIG_FILE).is_file():
        meta = read_model_config(folder, format=COMBINER_FORMAT)
        sha256 = meta.get("sha256") or {}
        config = from_dict(CombinerRecord, meta["config"])
        clip = load_task_clip_config(config.model.clip, device=target)
        if (folder / _CLIP_FILE).is_file():
            read_weights(clip, folder / _CLIP_FILE, sha256=sha256.get(_CLIP_FILE), device=target)
        fuser = build_fuser(config, clip.feature_dim)
        if config.stage == 2:
            read_weights(fuser, folder / _FUSER_FILE, sha256=sha256.get(_FUSER_FILE), device=target)
    else:
        config, clip, fuser = _from_checkpoint(folder, device=target)
    return CombinerModel(clip=clip.eval(), fuser=fuser.to(target).eval(), config=config, folder=folder)


def _from_checkpoint(folder: Path, *, device: torch.device) -> tuple[CombinerRecord, ClipBundle, nn.Module]:
    """A training checkpoint, rebuilt from the task config its sidecar recorded."""
    sidecar = read_json(folder / "checkpoint.json", what="checkpoint sidecar", allow_nonfinite=True)
    task = upgrade_config_dict((sidecar.get("config") or {}).get("task") or {})
    config = CombinerRecord(
        stage=int(task.get("stage", 1)), model=from_dict(CombinerModelConfig, task.get("model") or {})
    )
    output_dir = ((task.get("trainer") or {}).get("output_dir")) or "."
    clip = load_combiner_clip(config, output_dir=output_dir, device=device)  # pretrained or stage-1 weights
    fuser = build_fuser(config, clip.feature_dim)
    load_model_weights(clip if config.stage == 1 else fuser, folder, device=device)
    return config, clip, fuser


def load_cir_model(
    checkpoint: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[ClipBundle, nn.Module, CombinerRecord]:
    """CLIP, fuser and recorded config of a ``combiner`` model folder, checkpoint or run folder
    (:func:`capret.load` with ``kind="combiner"``, unpacked)."""
    model = load(checkpoint, kind="combiner", device=device)
    return model.clip, model.fuser, model.config
