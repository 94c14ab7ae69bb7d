"""Small shared I/O helpers, each written once: atomic file writes, the default device, model folder lookup.

Atomic writes go to a temporary file in the destination folder and are published with one ``os.replace``, so a
reader (or a rerun after ``kill -9``) sees either the old complete file or the new complete file, never a torn
one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from capret.errors import DataError, MissingFileError

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cache_dir",
    "check_weights_folder",
    "default_device",
    "disk_full_named",
    "file_sha256",
    "load_safetensors",
    "load_state_into",
    "read_json",
    "read_text",
    "resolve_model_folder",
    "step_checkpoints",
]


@contextlib.contextmanager
def disk_full_named(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a full disk or quota (``ENOSPC``/``EDQUOT``) inside the block into a
    :class:`~capret.errors.DiskFullError` that says "disk full" and names ``path``: the OS error raised by a
    write on an open file names no file, and a user cannot act on "[Errno 28]" alone."""
    from capret.errors import CapretError, DiskFullError

    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(exc, CapretError):
            raise
        raise DiskFullError(
            f"disk full: no space left on the device while writing {path}; free space (or choose an output on "
            "another disk) and rerun",
            path=Path(path),
        ) from None


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], object], *, fsync: bool = False
) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it over ``path``.

    The temporary name carries the pid and a random suffix, so concurrent writers never share one; it is removed
    when ``write`` fails. ``fsync`` flushes the file to disk before the rename (for files a crash must not lose).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with disk_full_named(path):
            write(tmp)
            if fsync:
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


def atomic_write_json(
    path: str | os.PathLike[str],
    obj: Any,
    *,
    indent: int | None = None,
    fsync: bool = False,
    default: Any = None,
) -> Path:
    """``obj`` as JSON (NaN allowed only where the caller's data has it: the standard library writes it)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=default), fsync=fsync)


def cache_dir(*parts: str) -> Path:
    """The user cache folder ``$CAPRET_CACHE`` (default ``~/.cache/capret``), joined with ``parts``.

    Caches never go inside a dataset root: shared dataset storage is often read-only, and a cache written beside
    the data would be picked up by every other user of that copy.
    """
    base = os.environ.get("CAPRET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "capret")
    return Path(base, *parts)


def _reject_constant(name: str) -> Any:
    raise DataError(f"non-finite number {name}")


class _DuplicateKeyError(ValueError):
    """A JSON object names one key twice (json keeps the last silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def read_text(path: str | os.PathLike[str], *, what: str = "text file") -> str:
    """A UTF-8 text file's content; a missing, unreadable or non-UTF-8 file is a
    :class:`~capret.errors.DataError` naming it (Python's own decode error names no file)."""
    from capret.errors import DataError, MissingFileError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}", path=path)
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise DataError(f"{what} cannot be read ({exc.strerror or exc})", path=path) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} is not UTF-8 text (byte {exc.start}: {exc.reason})", path=path) from None


def read_json(path: str | os.PathLike[str], *, what: str = "JSON file", allow_nonfinite: bool = False) -> Any:
    """Parse a JSON file; every failure is a :class:`~capret.errors.DataError` naming the file.

    Missing or unreadable files, bytes that are not UTF-8, syntax errors (with line and column), an object that
    names one key twice (json keeps the last one silently: a query item would quietly become a gallery item) and
    -- unless ``allow_nonfinite`` -- the non-standard constants ``NaN``/``Infinity`` that Python's json module
    accepts silently (an ``Infinity`` box would otherwise reach the metrics as a valid number).
    """
    from capret.errors import DataError

    path = Path(path)
    text = read_text(path, what=what)
    try:
        if allow_nonfinite:
            return json.loads(text, object_pairs_hook=_unique_keys)
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{what} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", path=path
        ) from None
    except _DuplicateKeyError as exc:
        raise DataError(
            f"{what} names the key {exc.args[0]!r} twice in one object (JSON keeps only the last one)",
            path=path,
        ) from None
    except ValueError as exc:  # a NaN/Infinity constant
        raise DataError(f"{what} holds a {exc}; only finite numbers are valid", path=path) from None


def file_sha256(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (memory bounded)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_safetensors(path: str | os.PathLike[str], *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing, truncated or corrupt file raises
    :class:`~capret.errors.CheckpointError` naming it (safetensors' own error names no path)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from capret.errors import CheckpointError, IncompleteCheckpointError

    path = Path(path)
    if not path.is_file():
        raise IncompleteCheckpointError(f"weights file {path} does not exist", path=path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"cannot read safetensors weights ({exc}); the file is truncated or corrupt", path=path
        ) from None


#: weight files written with pickle (``torch.save``): never loaded from a user's folder, unpickling can run code
PICKLED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights_folder(source: str | os.PathLike[str]) -> None:
    """Refuse a local model folder that ``from_pretrained`` would unpickle or choke on, naming the file.

    A folder whose weights are only pickles (``pytorch_model.bin``...) is refused: transformers would hand it to
    ``torch.load``, which either runs the pickle's code or fails with a long unpickling traceback that names no
    file. Every ``*.safetensors`` file is opened (header only, no tensor read), so a truncated or non-safetensors
    file is refused here with its path instead of deep inside transformers. Hub ids (not local folders) pass.

    Raises:
        CheckpointError: naming the pickled or corrupt file.
    """
    from safetensors import SafetensorError, safe_open

    from capret.errors import CheckpointError

    folder = Path(source)
    if not folder.is_dir():
        return
    files = sorted(p for p in folder.iterdir() if p.is_file())
    tensors = [p for p in files if p.suffix == ".safetensors"]
    pickled = [p for p in files if p.suffix in PICKLED_WEIGHT_SUFFIXES]
    if pickled and not tensors:
        raise CheckpointError(
            "holds pickled PyTorch weights, which capret never loads (unpickling a file can run code); convert them "
            "to model.safetensors (safetensors.torch.save_file) and remove the pickle",
            path=pickled[0],
        )
    for path in tensors:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"cannot read safetensors weights ({exc}); the file is truncated or corrupt", path=path
            ) from None


def load_state_into(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    built_from: str = "its config",
) -> None:
    """Load a safetensors file into ``module`` after checking its checksum, names and shapes, so every mismatch
    is a :class:`~capret.errors.CheckpointError` naming the file and the tensor (torch's own strict-load error is
    a multi-line traceback that names neither the file nor which side is wrong).

    Args:
        sha256: the hex digest recorded when the file was written (None: nothing recorded, not checked).
        built_from: what the module was built from, for the message (e.g. the config file's name).
    """
    from capret.errors import CheckpointError

    path = Path(path)
    if sha256 is not None and path.is_file() and file_sha256(path) != sha256:
        raise CheckpointError(
            "fails its SHA-256 checksum: the file is truncated or corrupt (changed after saving); save the "
            "model again",
            path=path,
        )
    state = load_safetensors(path)
    own = module.state_dict()
    extra = sorted(set(state) - set(own))
    if extra:
        raise CheckpointError(
            f"holds tensor {extra[0]!r} ({len(extra)} unexpected in all) that the model built from {built_from} "
            "does not have; the file belongs to another architecture",
            path=path,
        )
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(
            f"lacks tensor {missing[0]!r} ({len(missing)} missing in all) of the model built from {built_from}",
            path=path,
        )
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"tensor {key!r} has shape {list(value.shape)} but {list(own[key].shape)} in the model built "
                f"from {built_from}",
                path=path,
            )
    module.load_state_dict(state, strict=True)


def default_device(
    device: str | torch.device | None = None, *, local_rank: int | None = None
) -> torch.device:
    """``device`` as a ``torch.device``; None picks CUDA when available, else the CPU.

    ``local_rank`` (a torchrun process's GPU on its node) makes the CUDA default ``cuda:<local_rank>``, so every
    process of a multi-GPU job picks its own GPU; an explicit ``device`` is returned as given.
    """
    if device is None or device == "":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)
    return torch.device(device)


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders ``<run_dir>/checkpoints/step_<n>`` (sidecar present), oldest step first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        suffix = child.name.removeprefix("step_")
        if child.is_dir() and child.name.startswith("step_") and suffix.isdigit():
            if (child / "checkpoint.json").is_file():
                found.append((int(suffix), child))
    return [p for _, p in sorted(found)]


def resolve_model_folder(path: str | Path, *, markers: tuple[str, ...] = ("checkpoint.json",)) -> Path:
    """The folder holding a model for ``path``, with one precedence for every task.

    ``path`` itself when it holds one of ``markers`` (a model folder or a checkpoint), else its ``model/``, else
    its ``best/``, else its newest complete ``checkpoints/step_*``.

    Raises:
        FileNotFoundError: naming ``path`` and what was looked for.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist")

    def holds(folder: Path) -> bool:
        return any((folder / m).is_file() for m in markers)

    if holds(path):
        return path
    for candidate in (path / "model", path / "best"):
        if holds(candidate):
            return candidate
    steps = step_checkpoints(path)
    if steps:
        return steps[-1]
    raise MissingFileError(
        f"{path} is not a capret model folder or checkpoint (none of {', '.join(markers)}) nor a run folder with "
        "model/, best/ or checkpoints/step_*"
    )
