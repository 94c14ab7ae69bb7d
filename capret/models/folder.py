"""The self-describing model folder: one ``capret_model.json`` whose ``kind`` names what the folder holds.

Every export of every task (and every checkpoint converter) writes a folder::

    <folder>/capret_model.json    {"kind": "<kind>", "format": "capret.<kind>/<n>", "config": {...}, ...}
    <folder>/*.safetensors        the weights (file names are the kind's own)
    <folder>/<assets>/            optional: tokenizer, processor or encoder configs the kind needs offline

``kind`` is the name :func:`capret.load` dispatches on (``dualstream``, ``detector``, ``combiner``, ``phi``,
``pic2word``, ``lincir``, ``clip``, ...); ``config`` is the *model* config (never the trainer's or the data's),
so inference rebuilds the architecture from the folder alone. Folders written before ``kind`` existed are still
read: :func:`folder_kind` infers their kind from the files they hold (a dual-stream ``capret_model.json``
without ``kind``, a detector's ``capret_detector.json``, or a training checkpoint's ``checkpoint.json`` whose
recorded task names the kind).

This module sits in :mod:`capret.models` because writers (models' ``save_pretrained``, the tasks' exports,
checkpoint converters) and readers (:mod:`capret.inference.model_kinds`) both need it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from capret.errors import CheckpointError
from capret.io import atomic_write, atomic_write_json, load_state_into

M = TypeVar("M", bound=nn.Module)

__all__ = [
    "CHECKPOINT_SIDECAR",
    "LEGACY_DETECTOR_CONFIG_FILE",
    "MODEL_CONFIG_FILE",
    "MODEL_MARKERS",
    "ModelFolderError",
    "folder_kind",
    "read_model_config",
    "read_weights",
    "write_model_config",
    "write_weights",
]

#: the file that makes a folder a capret model folder
MODEL_CONFIG_FILE = "capret_model.json"
#: what detector folders were described by before every kind shared ``capret_model.json``
LEGACY_DETECTOR_CONFIG_FILE = "capret_detector.json"
#: a training checkpoint's sidecar (``capret.engine.checkpoint``); it records the task config
CHECKPOINT_SIDECAR = "checkpoint.json"
#: the files :func:`capret.io.resolve_model_folder` looks for, best first
MODEL_MARKERS: tuple[str, ...] = (MODEL_CONFIG_FILE, LEGACY_DETECTOR_CONFIG_FILE, CHECKPOINT_SIDECAR)

_KIND = re.compile(r"^[a-z][a-z0-9_]*$")
#: format strings of the folders written before ``kind`` was recorded
_LEGACY_FORMATS = {"capret.dual_stream/1": "dualstream", "capret.detector/1": "detector"}


class ModelFolderError(CheckpointError):
    """A model folder's ``capret_model.json`` is missing, unreadable, or names a kind nothing can load."""


def write_model_config(
    directory: str | Path, *, kind: str, format: str, config: dict[str, Any], **extra: Any
) -> Path:
    """Write ``<directory>/capret_model.json`` (atomically) with ``kind``, ``format``, ``config`` and ``extra``.

    ``extra`` holds what a kind records beside its model config (provenance, the trainer's config it came from);
    readers never need it to rebuild the model.
    """
    if not _KIND.match(kind):
        raise ModelFolderError(f"kind {kind!r} is not a lower-case identifier", path=directory)
    clash = {"kind", "format", "config"} & set(extra)
    if clash:
        raise ModelFolderError(f"extra keys {sorted(clash)} would overwrite the folder's own", path=directory)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"kind": kind, "format": format, "config": config, **extra}
    return atomic_write_json(directory / MODEL_CONFIG_FILE, meta, indent=2)


def write_weights(path: str | Path, module: nn.Module, *, format: str) -> Path:
    """Write ``module``'s state as safetensors (atomically); every tensor is copied to CPU on its own storage,
    because safetensors rejects tensors that share memory (tied or sliced weights)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": format}))
    return path


def read_weights(
    module: M,
    path: str | Path,
    *,
    sha256: str | None = None,
    device: str | torch.device | None = "cpu",
    built_from: str | None = None,
) -> M:
    """Load a safetensors file written by :func:`write_weights` into ``module`` (strict: same names, shapes),
    after checking its SHA-256 when the folder recorded one (``capret_model.json``'s ``sha256``).

    Args:
        device: where the module goes afterwards; None leaves it where it is.
        built_from: what ``module`` was built from, for the messages (default: the folder's config file).

    Raises:
        CheckpointError: the file is missing, fails its checksum, or a tensor is missing, unexpected or of
            another shape (named).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("model weights are missing", path=path)
    load_state_into(
        module,
        path,
        sha256=sha256,
        built_from=built_from or f"the config in {path.parent / MODEL_CONFIG_FILE}",
    )
    return module if device is None else module.to(device)


def read_model_config(folder: str | Path, *, format: str | None = None) -> dict[str, Any]:
    """The parsed ``capret_model.json`` (or legacy ``capret_detector.json``) of ``folder``, ``kind`` filled in.

    Args:
        format: if given, the folder's ``format`` must be this one (a loader reads only the layout it knows).

    Raises:
        ModelFolderError: neither file exists, it is not a JSON object, or its format is not ``format``.
    """
    folder = Path(folder)
    for name in (MODEL_CONFIG_FILE, LEGACY_DETECTOR_CONFIG_FILE):
        path = folder / name
        if path.is_file():
            meta = _read_object(path)
            if format is not None and meta.get("format") != format:
                raise ModelFolderError(f"format {meta.get('format')!r} is not {format!r}", path=path)
            if "kind" not in meta:
                meta["kind"] = _LEGACY_FORMATS.get(str(meta.get("format")), "")
                if not meta["kind"]:
                    raise ModelFolderError(
                        f"no 'kind' and an unknown format {meta.get('format')!r} (known: "
                        f"{', '.join(sorted(_LEGACY_FORMATS))})",
                        path=path,
                    )
            return meta
    raise ModelFolderError(f"no {MODEL_CONFIG_FILE}: not a capret model folder", path=folder)


def folder_kind(folder: str | Path) -> str:
    """The kind of a model folder or training checkpoint, recorded or inferred from its files.

    Precedence: ``capret_model.json`` (its ``kind``, or the kind its legacy ``format`` implies), then the legacy
    ``capret_detector.json``, then a checkpoint sidecar's recorded ``config.task.task`` (a dual-stream
    checkpoint records a ``model`` section with ``visual``/``text`` streams instead of a task name).

    Raises:
        ModelFolderError: naming the folder and the files looked for, when none of them says a kind.
    """
    folder = Path(folder)
    if any((folder / name).is_file() for name in (MODEL_CONFIG_FILE, LEGACY_DETECTOR_CONFIG_FILE)):
        return str(read_model_config(folder)["kind"])
    sidecar = folder / CHECKPOINT_SIDECAR
    if sidecar.is_file():
        config = _read_object(sidecar).get("config") or {}
        task = config.get("task") if isinstance(config, dict) else None
        if isinstance(task, dict) and isinstance(task.get("task"), str):
            return str(task["task"])
        if isinstance(task, dict) and _is_dual_stream(task.get("model")):
            return "dualstream"
        if isinstance(config, dict) and _is_dual_stream(config.get("model")):
            return "dualstream"
        raise ModelFolderError("the checkpoint sidecar records no task name (config.task.task)", path=sidecar)
    raise ModelFolderError(
        f"none of {', '.join(MODEL_MARKERS)}: not a capret model folder or training checkpoint", path=folder
    )


def _is_dual_stream(model: Any) -> bool:
    return isinstance(model, dict) and "visual" in model and "text" in model


def _read_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read ({type(exc).__name__}: {exc})", path=path) from exc
    if not isinstance(data, dict):
        raise ModelFolderError(f"holds a {type(data).__name__}, not a JSON object", path=path)
    return data
