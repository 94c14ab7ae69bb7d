"""Feature folders that cannot lie: shards written aside, published by one atomic manifest rename.

Layout of an extraction folder ``OUT`` (one manifest per rank, so ranks never share a file)::

    OUT/manifest_r{rank}.json                        identity, counts, every shard with its SHA-256
    OUT/features_r{rank}_{shard:05d}_{run}.npy       float32 [n, D]
    OUT/ids_r{rank}_{shard:05d}_{run}.npy            the ids as a numpy unicode array (no newline parsing)

A run writes its shards into ``OUT/.incoming-r{rank}-{run}/``, moves them to names that carry its random run
token (so they never replace a file the current manifest lists), then replaces the manifest with one
``os.replace`` and only then deletes the files the new manifest does not list (the old run's shards, shards of a
run with another shard size, leftovers of killed runs). A reader trusts only the manifest, so after ``kill -9``
at any moment the folder reads as the old complete run or the new complete run, never a mix.

The manifest's ``identity`` (model fingerprint, image list, captions, precision, world size) says what the
features are; a run into a folder whose identity differs refuses unless ``overwrite`` is set, so features of
two models never sit under one manifest.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capret.errors import DataError, NonFiniteError, OutputFolderError
from capret.io import atomic_write, atomic_write_json, file_sha256, read_json

__all__ = [
    "MANIFEST_VERSION",
    "ExtractionWriter",
    "check_finite_rows",
    "check_output_folder",
    "folder_fingerprint",
    "ids_fingerprint",
    "manifest_path",
    "read_extraction",
]

MANIFEST_VERSION = 2
_SHARD_FILE = re.compile(r"^(features|ids)_r(\d+)_\d{5}(_[0-9a-f]+)?\.(npy|txt)$")
_MANIFEST_FILE = re.compile(r"^manifest_r(\d+)\.json$")


def manifest_path(out: Path, rank: int) -> Path:
    return out / f"manifest_r{rank}.json"


def folder_fingerprint(folder: str | Path) -> str:
    """SHA-256 over the names and contents of the files directly in a model folder (what the model *is*)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(path.name.encode("utf-8") + b"\0" + file_sha256(path).encode("ascii") + b"\n")
    return digest.hexdigest()[:32]


def ids_fingerprint(ids: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for ident in ids:
        digest.update(ident.encode("utf-8") + b"\0")
    return digest.hexdigest()[:32]


def check_finite_rows(features: np.ndarray, *, model: str, ids: Sequence[str]) -> None:
    """Refuse features holding NaN or Inf before anything is written, naming the model and the first bad row.

    A model with NaN weights embeds every image as NaN; published with checksums, those rows look valid to every
    reader and score NaN against everything (which sorts anywhere), so a broken model must stop the run here.

    Raises:
        NonFiniteError: naming ``model``, the row's id and its position.
    """
    finite = np.isfinite(features).all(axis=tuple(range(1, features.ndim))) if features.size else None
    if finite is None or bool(finite.all()):
        return
    row = int(np.argmin(finite))
    count = int((~finite).sum())
    raise NonFiniteError(
        f"model {model} produced non-finite features (NaN/Inf) for {count} of {len(finite)} rows, first row "
        f"{row} (id {ids[row]!r}); nothing was written (are the model's weights NaN?)"
    )


def _existing_manifests(out: Path) -> dict[int, Path]:
    if not out.is_dir():
        return {}
    found = {}
    for path in out.iterdir():
        match = _MANIFEST_FILE.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def check_output_folder(out: Path, *, identity: dict[str, Any], overwrite: bool) -> None:
    """Refuse ``out`` when it holds features of a different model or configuration (unless ``overwrite``).

    Raises:
        OutputFolderError: naming the folder and the identity keys that differ.
    """
    if overwrite:
        return
    for rank, path in _existing_manifests(out).items():
        try:
            old = read_json(path, what="extraction manifest").get("identity")
        except (DataError, AttributeError):
            old = None
        if not isinstance(old, dict):  # an older layout or a damaged manifest: not ours to mix with
            raise OutputFolderError(
                f"holds {path.name} of an earlier capret-extract layout or a damaged manifest; pass --overwrite "
                "to replace it, or choose another --out",
                path=out,
            )
        differing = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if differing:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in differing[:4])
            raise OutputFolderError(
                f"holds features of a different run (rank {rank}; {detail}); pass --overwrite to replace them, "
                "or choose another --out",
                path=out,
            )


@dataclass
class ExtractionWriter:
    """Writes one rank's shards aside and publishes them atomically (see the module docstring).

    Use as a context manager: leaving the block without :meth:`publish` (an error, a kill) removes the
    incoming folder and leaves the published run untouched.
    """

    out: Path
    rank: int
    world_size: int
    identity: dict[str, Any]
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    shards: list[dict[str, Any]] = field(default_factory=list)
    #: whether __enter__ made ``out`` (a refused first run removes it again)
    _created: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.incoming = self.out / f".incoming-r{self.rank}-{self.run}"

    def __enter__(self) -> ExtractionWriter:
        self._created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob(f".incoming-r{self.rank}-*"):  # leftovers of killed runs of this rank
            shutil.rmtree(stale, ignore_errors=True)
        self.incoming.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.incoming, ignore_errors=True)
        if self._created and exc[0] is not None and not any(self.out.iterdir()):
            self.out.rmdir()  # a refused first run leaves no empty folder behind

    def write_shard(self, features: np.ndarray, ids: Sequence[str]) -> dict[str, Any]:
        """Write one shard (features and ids) into the incoming folder; returns its manifest entry."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(ids):
            raise ValueError(f"shard of {features.shape} features for {len(ids)} ids")
        index = len(self.shards)
        entry: dict[str, Any] = {"rows": int(features.shape[0])}
        for kind, array in (("features", features), ("ids", np.asarray(list(ids), dtype=np.str_))):
            name = f"{kind}_r{self.rank}_{index:05d}_{self.run}.npy"

            def save(tmp: Path, array: np.ndarray = array) -> None:
                with open(tmp, "wb") as fh:
                    np.save(fh, array, allow_pickle=False)

            atomic_write(self.incoming / name, save, fsync=True)
            entry[kind] = name
            entry[f"{kind}_sha256"] = file_sha256(self.incoming / name)
        self.shards.append(entry)
        return entry

    def publish(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Move the shards in, replace the manifest atomically, then delete every file it does not list."""
        for entry in self.shards:
            for kind in ("features", "ids"):
                os.replace(self.incoming / entry[kind], self.out / entry[kind])
        _fsync_dir(self.out)
        manifest = {
            "version": MANIFEST_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "identity": self.identity,
            "rows": sum(s["rows"] for s in self.shards),
            **extra,
            "shards": self.shards,
        }
        atomic_write_json(manifest_path(self.out, self.rank), manifest, indent=2, fsync=True)
        _fsync_dir(self.out)
        self._remove_stale()
        return manifest

    def _remove_stale(self) -> None:
        listed = {entry[kind] for entry in self.shards for kind in ("features", "ids")}
        for path in self.out.iterdir():
            match = _SHARD_FILE.match(path.name)
            if match and int(match.group(2)) == self.rank and path.name not in listed:
                path.unlink(missing_ok=True)
        if self.rank == 0:  # ranks beyond this run's world size belong to an older run
            for rank, path in _existing_manifests(self.out).items():
                if rank >= self.world_size:
                    path.unlink(missing_ok=True)
                    for shard in self.out.glob(f"*_r{rank}_*"):
                        if _SHARD_FILE.match(shard.name):
                            shard.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_extraction(out: str | Path, *, verify: bool = True) -> tuple[np.ndarray, list[str]]:
    """Features ``[N, D]`` and ids of an extraction folder, rank by rank, shard by shard.

    Only files listed by the manifests are read; ``verify`` checks every file's SHA-256 first (``verify=False``
    is the explicit way to skip it). Every rank ``0 .. world_size - 1`` must be present with the same identity.
    Features holding NaN or Inf are refused whatever ``verify`` says (a checksum only proves the bytes are the
    ones written, not that they are numbers).

    Raises:
        DataError: naming the folder and what is missing, mismatched or corrupt.
        NonFiniteError: naming the shard that holds NaN or Inf.
    """
    out = Path(out)
    manifests = {
        rank: read_json(path, what="extraction manifest") for rank, path in _existing_manifests(out).items()
    }
    if not manifests:
        raise DataError("no manifest_r*.json: not a complete capret-extract folder", path=out)
    first = manifests[min(manifests)]
    world = int(first.get("world_size", 1))
    if sorted(manifests) != list(range(world)):
        raise DataError(f"manifests of ranks {sorted(manifests)} for a world size of {world}", path=out)
    features, ids = [], []
    for rank, manifest in manifests.items():
        if manifest.get("identity") != first.get("identity"):
            raise DataError(f"manifest_r{rank}.json describes another run than manifest_r0.json", path=out)
        for entry in manifest.get("shards", []):
            for kind in ("features", "ids"):
                path = out / entry[kind]
                if not path.is_file():
                    raise DataError(
                        f"shard {entry[kind]} listed by manifest_r{rank}.json is missing", path=out
                    )
                if verify and file_sha256(path) != entry[f"{kind}_sha256"]:
                    raise DataError(f"shard {entry[kind]} fails its checksum (corrupt or replaced)", path=out)
            shard = np.load(out / entry["features"], allow_pickle=False)
            bad = np.argwhere(~np.isfinite(shard)) if shard.dtype.kind == "f" else np.zeros((0, 2))
            if len(bad):
                raise NonFiniteError(
                    f"shard {entry['features']} listed by manifest_r{rank}.json holds a non-finite value "
                    f"(row {int(bad[0][0])}); features must be finite, extract again with a sound model",
                    path=out,
                )
            features.append(shard)
            ids.extend(np.load(out / entry["ids"], allow_pickle=False).tolist())
    stacked = np.concatenate(features) if features else np.zeros((0, int(first.get("dim", 0))), np.float32)
    return stacked, ids
