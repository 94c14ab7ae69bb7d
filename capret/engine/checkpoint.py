"""Pickle-free training checkpoints: safetensors for every tensor, JSON for everything else.

A checkpoint is a folder::

    step_00001000/
      model.safetensors          model weights (``state_dict`` of the unwrapped model)
      training_state.safetensors every tensor of the optimizer / scheduler / AMP scaler / RNG states
      training_state.json        the non-tensor rest of those states, tensors replaced by references
      checkpoint.json            sidecar: step, epoch, config, metrics, git revision, package versions

Why no pickle: ``torch.save`` files execute arbitrary code when a user loads a file somebody else wrote
(the "dead checkpoint link, here is my re-upload" situation of the CIR repositories). Optimizer states are
nested dicts of tensors and numbers, so they are flattened: each tensor goes into ``training_state.safetensors``
under its dotted path, and the JSON keeps a ``{"__tensor__": path}`` reference in its place. Tuples, non-string
dict keys (optimizer states are keyed by parameter index) and numpy arrays (numpy's RNG state) carry small
type markers so that they round-trip exactly.

The folder is written under a temporary name and renamed at the end, and ``checkpoint.json`` is the last file
written, so a crash mid-save never leaves a folder that :func:`find_latest_checkpoint` would pick up.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from capret.engine.shape_check import check_shapes, config_differences
from capret.errors import CheckpointError, DataError, IncompleteCheckpointError
from capret.io import file_sha256, load_safetensors, read_json

__all__ = [
    "CHECKPOINT_FILES",
    "LoadedCheckpoint",
    "capture_rng_state",
    "config_differences",
    "decode_state",
    "encode_state",
    "find_latest_checkpoint",
    "git_revision",
    "list_checkpoints",
    "newest_intact_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "package_versions",
    "prune_checkpoints",
    "resolve_resume",
    "restore_rng_state",
    "save_checkpoint",
    "seed_everything",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_TENSORS_FILE = "training_state.safetensors"
STATE_JSON_FILE = "training_state.json"
SIDECAR_FILE = "checkpoint.json"
CHECKPOINT_FILES = (MODEL_FILE, STATE_TENSORS_FILE, STATE_JSON_FILE, SIDECAR_FILE)
FORMAT_NAME = "capret-checkpoint"
FORMAT_VERSION = 1

#: packages whose versions go into the sidecar (missing ones are skipped)
_VERSIONED_PACKAGES = (
    "capret",
    "torch",
    "torchvision",
    "numpy",
    "safetensors",
    "transformers",
    "timm",
    "pytorch-metric-learning",
    "faiss-cpu",
)


# --------------------------------------------------------------------------------------------------
# nested state <-> (JSON, tensors)
# --------------------------------------------------------------------------------------------------


def encode_state(obj: Any, tensors: dict[str, torch.Tensor], *, prefix: str) -> Any:
    """Turn a nested state (dicts, lists, tuples, tensors, numpy arrays, scalars) into JSON-able data.

    Tensors are moved to ``tensors`` under a dotted path derived from ``prefix`` and replaced by a reference.

    Raises:
        TypeError: for an object that has no lossless JSON/safetensors form (its path is in the message).
    """
    if isinstance(obj, torch.Tensor):
        # clone: safetensors refuses tensors that share storage (e.g. views into one flat buffer)
        tensors[prefix] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"{prefix}: numpy array of dtype {obj.dtype} cannot be checkpointed")
        # unsigned numpy dtypes (the MT19937 key is uint32) are widened to int64, the dtype is kept aside
        wide = obj.astype(np.int64) if obj.dtype.kind in "bu" else obj
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(wide).copy())
        return {"__ndarray__": prefix, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors, prefix=f"{prefix}.{k}") for k, v in obj.items()}
        items = []
        for i, (key, value) in enumerate(obj.items()):
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise TypeError(f"{prefix}: dict key {key!r} of type {type(key).__name__} is not supported")
            items.append([key, encode_state(value, tensors, prefix=f"{prefix}.{i}")])
        return {"__dict_items__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, prefix=f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, prefix=f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(
        f"{prefix}: value of type {type(obj).__name__} cannot be stored without pickle; "
        "only tensors, numpy arrays, numbers, strings, None, lists, tuples and dicts are supported"
    )


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
        if "__tuple__" in obj:
            return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
        if "__dict_items__" in obj:
            return {key: decode_state(value, tensors) for key, value in obj["__dict_items__"]}
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# RNG states (exact resume)
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states that a training step may consume (checkpointable by ``encode_state``)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (also accepts the list-for-tuple forms of a JSON round trip)."""

    def as_tuple(value: Any) -> Any:
        return tuple(as_tuple(v) for v in value) if isinstance(value, list | tuple) else value

    random.setstate(as_tuple(state["python"]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.to(torch.uint8) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "checkpoint has %d CUDA RNG states for %d devices; not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )


# --------------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def git_revision() -> str | None:
    """``git rev-parse HEAD`` of the source tree capret is imported from, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    revision = out.stdout.strip()
    return revision if out.returncode == 0 and revision else None


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide whether a checkpoint reproduces."""
    versions = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copy of the state dict; tied weights are duplicated because safetensors rejects shared storage."""
    state = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        tensor = value.detach()
        ident = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if tensor.device.type != "cpu" or ident in seen or not tensor.is_contiguous():
            tensor = tensor.to("cpu", copy=True).contiguous()
        elif ident is not None:
            seen.add(ident)
        state[key] = tensor
    return state


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=True))


def save_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    step: int,
    epoch: int,
    rng_state: Any = None,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (temporary folder, then rename) and return its path.

    Args:
        directory: the checkpoint folder to create; an existing folder of that name is replaced.
        model: the *unwrapped* model (no DDP wrapper, so keys carry no ``module.`` prefix).
        optimizer, scheduler, scaler: objects with ``state_dict()``; None to skip.
        step, epoch: training progress, stored in the sidecar.
        rng_state: nested RNG states (see ``capret.engine.trainer.capture_rng_state``).
        config: JSON-able configuration (trainer + task) stored in the sidecar.
        metrics: latest validation metrics, stored in the sidecar.
        trainer_state: JSON-able extra trainer bookkeeping (data position, best metric so far).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    save_file(_model_state(model), str(tmp / MODEL_FILE), metadata={"format": "pt"})

    tensors: dict[str, torch.Tensor] = {}
    state = {
        "optimizer": encode_state(optimizer.state_dict(), tensors, prefix="optimizer")
        if optimizer is not None
        else None,
        "scheduler": encode_state(scheduler.state_dict(), tensors, prefix="scheduler")
        if scheduler is not None
        else None,
        "scaler": encode_state(scaler.state_dict(), tensors, prefix="scaler") if scaler is not None else None,
        "rng": encode_state(rng_state, tensors, prefix="rng") if rng_state is not None else None,
        "trainer": encode_state(trainer_state or {}, tensors, prefix="trainer"),
    }
    save_file(tensors, str(tmp / STATE_TENSORS_FILE), metadata={"format": "pt"})
    _write_json(tmp / STATE_JSON_FILE, state)

    sidecar = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "epoch": int(epoch),
        "metrics": metrics or {},
        "config": config or {},
        "git_revision": git_revision(),
        "packages": package_versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "files": list(CHECKPOINT_FILES),
        # SHA-256 of every other file: loading verifies them, and --resume auto skips a checkpoint that fails
        "checksums": {name: file_sha256(tmp / name) for name in CHECKPOINT_FILES if name != SIDECAR_FILE},
    }
    _write_json(tmp / SIDECAR_FILE, sidecar)

    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` read besides the states it loaded into the objects passed to it."""

    path: Path
    step: int
    epoch: int
    metrics: dict[str, Any]
    config: dict[str, Any]
    rng_state: Any
    trainer_state: dict[str, Any] = field(default_factory=dict)
    sidecar: dict[str, Any] = field(default_factory=dict)


def _check_folder(directory: Path, *, files: tuple[str, ...] = CHECKPOINT_FILES) -> dict[str, Any]:
    """The sidecar of a checkpoint folder, after checking that ``files`` exist and match their checksums.

    Raises:
        CheckpointError: naming the folder and the missing file, or the file that fails its checksum.
    """
    if not directory.is_dir():
        raise IncompleteCheckpointError(f"checkpoint folder {directory} does not exist", path=directory)
    sidecar_path = directory / SIDECAR_FILE
    if not sidecar_path.is_file():
        present = sorted(p.name for p in directory.iterdir())
        raise IncompleteCheckpointError(
            f"{directory} is not a complete capret checkpoint: {SIDECAR_FILE} is missing "
            f"(found: {present or 'nothing'}); expected files {list(CHECKPOINT_FILES)}"
        )
    try:
        sidecar = read_json(sidecar_path, what="checkpoint sidecar", allow_nonfinite=True)
    except DataError as exc:
        raise CheckpointError(str(exc), path=sidecar_path) from None
    if not isinstance(sidecar, dict):
        raise CheckpointError(f"{sidecar_path}: expected a JSON object")
    if sidecar.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{sidecar_path}: format {sidecar.get('format')!r} is not {FORMAT_NAME!r}")
    checksums = sidecar.get("checksums") or {}
    for name in files:
        if name == SIDECAR_FILE:
            continue
        path = directory / name
        if not path.is_file():
            raise IncompleteCheckpointError(f"{directory}: checkpoint file {name} is missing", path=directory)
        if name in checksums and file_sha256(path) != checksums[name]:
            raise CheckpointError(
                f"{path}: fails its checksum in {SIDECAR_FILE} (truncated or modified after saving)"
            )
    if sidecar.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{sidecar_path}: format_version {sidecar['format_version']} is newer than this capret "
            f"understands ({FORMAT_VERSION}); upgrade capret"
        )
    return sidecar


def load_model_weights(
    model: nn.Module,
    path: str | Path,
    *,
    strict: bool = True,
    device: str | torch.device = "cpu",
    config: dict[str, Any] | None = None,
) -> nn.Module:
    """Load weights from a checkpoint folder or a bare ``.safetensors`` file into ``model`` (in place).

    A ``module.`` prefix (weights saved from a DDP-wrapped model by other tools) is stripped. The folder's
    checksums are verified first. ``config``: the configuration ``model`` was built from; on a shape mismatch
    the error then lists the keys that differ from the checkpoint's saved config.

    Raises:
        CheckpointError: a missing or corrupt file, a checksum failure, or a tensor shape mismatch (naming it).
        RuntimeError: with ``strict``, the keys do not match (torch lists the missing/unexpected ones).
    """
    path = Path(path)
    saved_config = None
    if path.is_dir():
        saved_config = dict(_check_folder(path, files=(MODEL_FILE,)).get("config") or {})
        path = path / MODEL_FILE
    if not path.is_file():
        raise IncompleteCheckpointError(
            f"model weights {path} do not exist (give a checkpoint folder or a .safetensors)"
        )
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: only .safetensors weights are loaded (no pickle files); got {path.suffix!r}"
        )
    state = load_safetensors(path, device=str(device))
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    check_shapes(model, state, path=path, saved_config=saved_config, config=config)
    model.load_state_dict(state, strict=strict)
    return model


def load_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    strict: bool = True,
    device: str | torch.device = "cpu",
    config: dict[str, Any] | None = None,
) -> LoadedCheckpoint:
    """Load a checkpoint folder written by :func:`save_checkpoint` into the given objects.

    Objects passed as None are skipped, so the same call serves inference (``model`` only) and resuming
    (everything). The RNG state is returned, not applied: the trainer applies it at the exact point of the
    data stream where it was captured. ``config`` (the current run's) makes a shape mismatch name the config
    keys that differ from the checkpoint's.
    """
    directory = Path(directory)
    sidecar = _check_folder(directory)
    if model is not None:
        load_model_weights(model, directory, strict=strict, device=device, config=config)
    tensors = load_safetensors(directory / STATE_TENSORS_FILE, device="cpu")
    try:
        raw_state = read_json(directory / STATE_JSON_FILE, what="training state", allow_nonfinite=True)
    except DataError as exc:
        raise CheckpointError(str(exc), path=directory / STATE_JSON_FILE) from None
    state = decode_state(raw_state, tensors)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if target is None:
            continue
        if state.get(name) is None:
            raise CheckpointError(f"{directory}: checkpoint holds no {name} state, cannot restore it")
        target.load_state_dict(state[name])
    return LoadedCheckpoint(
        path=directory,
        step=int(sidecar["step"]),
        epoch=int(sidecar["epoch"]),
        metrics=dict(sidecar.get("metrics") or {}),
        config=dict(sidecar.get("config") or {}),
        rng_state=state.get("rng"),
        trainer_state=dict(state.get("trainer") or {}),
        sidecar=sidecar,
    )


# --------------------------------------------------------------------------------------------------
# run-folder bookkeeping
# --------------------------------------------------------------------------------------------------

STEP_PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders (sidecar present) under ``checkpoints_dir``, oldest step first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if not child.is_dir() or not child.name.startswith(STEP_PREFIX):
            continue
        suffix = child.name[len(STEP_PREFIX) :]
        if suffix.isdigit() and (child / SIDECAR_FILE).is_file():
            found.append((int(suffix), child))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder (``<run_dir>/checkpoints/step_*``), or None."""
    checkpoints = list_checkpoints(Path(run_dir) / "checkpoints")
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(checkpoints_dir: str | Path, *, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints (0 keeps all); returns the deleted folders."""
    if keep_last <= 0:
        return []
    checkpoints = list_checkpoints(checkpoints_dir)
    doomed = checkpoints[:-keep_last]
    for path in doomed:
        shutil.rmtree(path)
        logger.debug("removed old checkpoint %s", path)
    return doomed


def safetensors_keys(path: str | Path) -> list[str]:
    """Tensor names in a safetensors file, read without loading the tensors (used by tests and tools)."""
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def verify_checkpoint(directory: str | Path, *, files: tuple[str, ...] = CHECKPOINT_FILES) -> dict[str, Any]:
    """The sidecar of a checkpoint folder; :class:`CheckpointError` when ``files`` are missing or fail their
    checksums."""
    return _check_folder(Path(directory), files=files)


def newest_intact_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of a run that passes :func:`verify_checkpoint`, and ``(folder, why)`` for every
    newer one that was skipped (a truncated or corrupt file after a crash or a full disk)."""
    skipped: list[tuple[Path, str]] = []
    for candidate in reversed(list_checkpoints(Path(run_dir) / "checkpoints")):
        try:
            verify_checkpoint(candidate)
        except CheckpointError as exc:
            skipped.append((candidate, str(exc)))
            continue
        return candidate, skipped
    return None, skipped


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """Checkpoint folder for ``resume``: 'auto' = the newest *intact* checkpoint in ``output_dir`` (None if
    there is none yet); newer ones that fail verification are skipped with a warning saying which and why."""
    if resume == "auto":
        found, skipped = newest_intact_checkpoint(output_dir)
        for folder, why in skipped:
            message = f"--resume auto: skipped checkpoint {folder.name}: {why}"
            logger.warning(message)
            print(f"warning: {message}", file=sys.stderr)
        if found is None and skipped:
            raise CheckpointError(
                f"--resume auto: every checkpoint under {output_dir / 'checkpoints'} is damaged "
                f"({len(skipped)} skipped); start afresh without --resume or repair one",
                path=output_dir,
            )
        return found
    path = Path(resume)
    if (path / "checkpoint.json").is_file():
        return path
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise IncompleteCheckpointError(
            f"--resume {resume}: no checkpoint there (expected a checkpoint folder with checkpoint.json, a run "
            "folder with checkpoints/step_*, or 'auto')"
        )
    return latest
