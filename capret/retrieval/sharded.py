"""Galleries beyond memory: sharded, memory-mapped feature arrays and IVF-PQ indexes built from them.

**Features folder** (written by ``capret index build`` / the extract path; one writer per rank, so ranks under
``torchrun`` never share a file)::

    DIR/features_r{rank}_{shard:05d}.npy   float32 [n, D] rows (``np.save`` format; read with ``mmap_mode="r"``)
    DIR/items_r{rank}_{shard:05d}.jsonl    one JSON object per row (``{"id": ...}`` plus whatever the writer adds)
    DIR/manifest_r{rank}.json              this rank's finished shards, rewritten atomically after each shard
    DIR/manifest.json                      the merged manifest of all ranks (:func:`merge_manifests`)

A manifest (per rank or merged) is one JSON object::

    {"format": "capret-sharded-features", "version": 1, "dim": D, "dtype": "float32", "world_size": W,
     "rows": N, "meta": {...},            # meta: the writer's own description (model, captions, ...)
     "shards": [{"name": "r0_00000", "rank": 0, "index": 0, "rows": n, "span": [start, stop],
                 "features": "features_r0_00000.npy", "items": "items_r0_00000.jsonl",
                 "sha256": "<hex digest of the .npy file>", "items_sha256": "<... of the .jsonl>"}, ...]}

Readers verify: :class:`ShardedFeatures` checks every listed file against its SHA-256 once, when it is opened
(``verify=False`` skips the check and says so in :attr:`ShardedFeatures.verified`), so a flipped byte in a shard
is refused with the shard's name instead of turning into scores above 1 for unit vectors.

``span`` is the range of the rank's *inputs* (e.g. images) the shard covers, which is what lets an interrupted
writer resume: shards already in the rank manifest are skipped. Global row numbers follow the merged order
(rank, then shard index); they are the ids an index built here returns. The legacy ``capret-extract`` layout (an
``ids_*.npy`` array -- or, from older versions, an ``ids_*.txt`` file -- instead of ``items``) is read as well.

**Indexes from shards** (:func:`build_ivf_from_shards`): the coarse quantiser and PQ codebooks are trained on a
sample of rows read shard by shard (the same rows :func:`capret.retrieval.index.training_rows` picks for the
in-memory build), then the vectors are added shard by shard in bounded chunks. With ``on_disk=True`` each shard
gets its own IVF file that faiss' ``merge_ondisk`` then merges into ``OnDiskInvertedLists`` (``lists.ivfdata``,
memory-mapped at search time), so neither the vectors nor the codes need to fit in memory.
:class:`ShardedIVFIndex` searches it and re-scores the PQ shortlist exactly from the memory-mapped shards — the
same computation as faiss' ``IndexRefineFlat``, which keeps all float vectors in memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

import faiss
import numpy as np
from tqdm.auto import tqdm

from capret.errors import CapretError, ConfigError, DataError
from capret.io import atomic_write_json, atomic_write_text, disk_full_named, file_sha256, read_json, read_text
from capret.retrieval.index import IvfpqOptions, as_float32, ivfpq_factory, ivfpq_options, training_rows

__all__ = [
    "FORMAT",
    "ShardInfo",
    "ShardWriter",
    "ShardedFeatures",
    "ShardedIVFIndex",
    "build_ivf_from_shards",
    "merge_manifests",
    "open_features",
    "verify_files",
]

FORMAT = "capret-sharded-features"
VERSION = 1
MANIFEST = "manifest.json"
_RANK_MANIFEST = re.compile(r"^manifest_r(\d+)\.json$")


def _sha256(path: Path) -> str:
    return file_sha256(path, chunk=1 << 22)


def verify_files(directory: Path, checksums: dict[str, str], *, what: str, listed_in: str) -> None:
    """Check files of ``directory`` against their SHA-256 hex digests (streamed, memory bounded).

    Raises:
        DataError: naming the first file that is missing or whose bytes differ from the digest recorded in
            ``listed_in`` (so the user knows which file to rebuild).
    """
    for name, expected in checksums.items():
        path = directory / name
        if not path.is_file():
            raise DataError(f"{what} {name} listed in {listed_in} is missing", path=path)
        if _sha256(path) != expected:
            raise DataError(
                f"{what} {name} fails its SHA-256 checksum in {listed_in} (corrupt or modified after it was "
                "written); rebuild it, or skip the check with --no-verify / verify=False",
                path=path,
            )


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a features folder (an entry of the manifest's ``shards`` list)."""

    name: str
    rank: int
    index: int
    rows: int
    features: str
    items: str | None = None  # items_*.jsonl (ids and per-row metadata)
    ids: str | None = None  # capret-extract layout: ids_*.npy (numpy unicode array) or legacy ids_*.txt
    span: tuple[int, int] | None = None
    sha256: str | None = None  # of the features file
    items_sha256: str | None = None  # of the items file

    @classmethod
    def from_dict(cls, entry: dict[str, Any], *, manifest: Path) -> ShardInfo:
        try:
            name = str(entry.get("name") or Path(entry["features"]).stem.removeprefix("features_"))
            match = re.match(r"^r(\d+)_(\d+)$", name)
            default_rank, default_index = (str(match[1]), str(match[2])) if match else ("0", "0")
            rank = int(entry.get("rank", default_rank))
            index = int(entry.get("index", default_index))
            span = entry.get("span")
            return cls(
                name=name,
                rank=rank,
                index=index,
                rows=int(entry["rows"]),
                features=str(entry["features"]),
                items=entry.get("items"),
                ids=entry.get("ids"),
                span=(int(span[0]), int(span[1])) if span is not None else None,
                sha256=entry.get("sha256"),
                items_sha256=entry.get("items_sha256"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"shard entry {entry!r} is invalid ({exc})", path=manifest) from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "rank": self.rank,
            "index": self.index,
            "rows": self.rows,
            "features": self.features,
        }
        for key in ("items", "ids", "sha256", "items_sha256"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.span is not None:
            out["span"] = list(self.span)
        return out


# ------------------------------------------------------------------------------------------------ writing


class ShardWriter:
    """Writes one rank's shards and its manifest; reopening it resumes after the last finished shard.

    Each :meth:`write` puts the ``.npy`` and ``.jsonl`` files in place (temporary name, then rename) *before*
    the rank manifest names them, so a shard listed in the manifest is always complete, and a killed writer
    leaves at most an unlisted shard that the next run rewrites.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        rank: int = 0,
        world_size: int = 1,
        dim: int,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.directory = Path(directory)
        self.rank, self.world_size, self.dim = int(rank), int(world_size), int(dim)
        self.meta = dict(meta or {})
        self.path = self.directory / f"manifest_r{self.rank}.json"
        self.shards: dict[int, ShardInfo] = {}
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            manifest = _read_json(self.path)
            _check_compatible(
                manifest, path=self.path, dim=self.dim, world_size=self.world_size, meta=self.meta
            )
            for entry in manifest.get("shards", []):
                info = ShardInfo.from_dict(entry, manifest=self.path)
                self.shards[info.index] = info

    def done(self, index: int) -> bool:
        """Whether shard ``index`` of this rank is already written (resume skips it)."""
        return index in self.shards

    def write(
        self,
        index: int,
        features: Any,
        items: Sequence[dict[str, Any]],
        *,
        span: tuple[int, int] | None = None,
    ) -> ShardInfo:
        """Write shard ``index`` (rows ``features`` with one item record each) and list it in the rank manifest."""
        array = as_float32(features, dim=self.dim, what=f"features of shard {index}")
        if len(items) != array.shape[0]:
            raise DataError(f"shard {index}: {len(items)} item records for {array.shape[0]} feature rows")
        name = f"r{self.rank}_{int(index):05d}"
        features_path = self.directory / f"features_{name}.npy"
        items_path = self.directory / f"items_{name}.jsonl"
        tmp = self.directory / f"features_{name}.tmp.npy"
        try:
            with disk_full_named(features_path):
                np.save(tmp, array)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(features_path)
        atomic_write_text(items_path, "".join(json.dumps(item) + "\n" for item in items))
        info = ShardInfo(
            name=name,
            rank=self.rank,
            index=int(index),
            rows=int(array.shape[0]),
            features=features_path.name,
            items=items_path.name,
            span=span,
            sha256=_sha256(features_path),
            items_sha256=_sha256(items_path),
        )
        self.shards[info.index] = info
        self._write_manifest()
        return info

    def _write_manifest(self) -> None:
        shards = [self.shards[i] for i in sorted(self.shards)]
        atomic_write_json(
            self.path,
            _manifest(shards, dim=self.dim, world_size=self.world_size, meta=self.meta),
            indent=1,
            fsync=True,
        )


def _manifest(
    shards: Sequence[ShardInfo], *, dim: int, world_size: int, meta: dict[str, Any]
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "dim": int(dim),
        "dtype": "float32",
        "world_size": int(world_size),
        "rows": int(sum(s.rows for s in shards)),
        "meta": meta,
        "shards": [s.to_dict() for s in shards],
    }


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json(path, what="manifest")  # a DataError naming the file, line and column
    if not isinstance(data, dict):
        raise DataError("a manifest must be a JSON object", path=path)
    return data


def _check_compatible(
    manifest: dict[str, Any], *, path: Path, dim: int, world_size: int, meta: dict[str, Any] | None
) -> None:
    """A resumed writer must continue the same job: same dimension, world size and description."""
    if int(manifest.get("dim", -1)) != dim:
        raise DataError(f"holds {manifest.get('dim')}-d features, this run writes {dim}-d", path=path)
    if int(manifest.get("world_size", 1)) != world_size:
        raise DataError(
            f"was written with world_size={manifest.get('world_size')}, this run has {world_size}; use a new "
            "output folder or the same number of ranks",
            path=path,
        )
    if meta is not None and manifest.get("meta", {}) != meta:
        raise DataError(
            f"was written by another job (meta {manifest.get('meta')!r}, now {meta!r}); use a new output folder",
            path=path,
        )


def _rank_manifests(directory: Path) -> dict[int, Path]:
    found = {}
    for path in directory.glob("manifest_r*.json"):
        match = _RANK_MANIFEST.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def _merged(directory: Path) -> dict[str, Any]:
    """The merged manifest of all rank manifests of ``directory`` (every rank must be present)."""
    ranks = _rank_manifests(directory)
    if not ranks:
        raise DataError(
            f"no {MANIFEST} and no manifest_r*.json (not a sharded features folder)", path=directory
        )
    manifests = {rank: _read_json(path) for rank, path in ranks.items()}
    first = manifests[min(manifests)]
    world_size = int(first.get("world_size", len(manifests)))
    dim = int(first["dim"]) if "dim" in first else -1
    missing = sorted(set(range(world_size)) - set(manifests))
    if missing:
        raise DataError(
            f"rank manifests missing for ranks {missing} of world_size {world_size}", path=directory
        )
    shards: list[ShardInfo] = []
    for rank in range(world_size):
        manifest = manifests[rank]
        _check_compatible(manifest, path=ranks[rank], dim=dim, world_size=world_size, meta=None)
        entries = [ShardInfo.from_dict(e, manifest=ranks[rank]) for e in manifest.get("shards", [])]
        shards.extend(sorted(entries, key=lambda s: s.index))
    return _manifest(shards, dim=dim, world_size=world_size, meta=dict(first.get("meta", {})))


def merge_manifests(directory: str | Path) -> Path:
    """Write ``DIR/manifest.json`` from the rank manifests (run once, after every rank has finished)."""
    directory = Path(directory)
    path = directory / MANIFEST
    atomic_write_json(path, _merged(directory), indent=1, fsync=True)
    return path


# ------------------------------------------------------------------------------------------------ reading


class ShardedFeatures:
    """Read access to a features folder: memory-mapped shards, global row numbers, per-row item records."""

    def __init__(
        self, directory: str | Path, manifest: dict[str, Any], *, manifest_name: str = MANIFEST
    ) -> None:
        self.directory = Path(directory)
        self.manifest_name = manifest_name
        if manifest.get("format", FORMAT) != FORMAT:
            raise DataError(f"format {manifest.get('format')!r} is not {FORMAT!r}", path=self.directory)
        if int(manifest.get("version", VERSION)) > VERSION:
            raise DataError(
                f"manifest version {manifest.get('version')} is newer than this capret reads ({VERSION})",
                path=self.directory / manifest_name,
            )
        #: whether :meth:`verify` passed for this opening (False: opened with ``verify=False``)
        self.verified = False
        self.dim = int(manifest["dim"])
        self.meta: dict[str, Any] = dict(manifest.get("meta", {}))
        self.shards = [ShardInfo.from_dict(e, manifest=self.directory) for e in manifest["shards"]]
        self.offsets = np.cumsum([0] + [s.rows for s in self.shards]).astype(np.int64)
        self._maps: dict[int, np.ndarray] = {}

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.rows

    def shard(self, i: int) -> np.ndarray:
        """Shard ``i`` as a read-only memory map ``[rows, dim]`` (opened once, kept for random access)."""
        if i not in self._maps:
            self._maps[i] = self._open(i)
        return self._maps[i]

    def _open(self, i: int) -> np.ndarray:
        info = self.shards[i]
        path = self.directory / info.features
        if not path.is_file():
            raise DataError(f"shard file {info.features} listed in the manifest is missing", path=path)
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.dtype != np.float32 or array.ndim != 2 or array.shape != (info.rows, self.dim):
            raise DataError(
                f"holds {array.dtype} {list(array.shape)}, the manifest says float32 [{info.rows}, {self.dim}]",
                path=path,
            )
        return array

    def close(self) -> None:
        """Drop the memory maps (their pages stop counting towards this process' resident memory)."""
        self._maps.clear()

    def iter_chunks(self, chunk_rows: int = 65_536) -> Iterator[tuple[int, np.ndarray]]:
        """``(first global row, float32 copy)`` chunks in row order; each shard is unmapped after its last chunk,
        so memory stays at one chunk whatever the gallery size."""
        for i in range(len(self.shards)):
            array = self._open(i)
            for start in range(0, array.shape[0], chunk_rows):
                yield int(self.offsets[i]) + start, np.array(array[start : start + chunk_rows])
            del array

    def gather(self, rows: Any) -> np.ndarray:
        """Vectors of arbitrary global ``rows`` (any shape of int64; ``-1`` gives a zero row)."""
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        out = np.zeros((flat.shape[0], self.dim), dtype=np.float32)
        valid = (flat >= 0) & (flat < self.rows)
        if np.any((flat >= self.rows) | (flat < -1)):
            raise IndexError(f"row numbers outside [0, {self.rows}) requested from {self.directory}")
        which = np.searchsorted(self.offsets, flat, side="right") - 1
        for i in np.unique(which[valid]):
            sel = np.nonzero(valid & (which == i))[0]
            local = flat[sel] - self.offsets[i]
            order = np.argsort(local, kind="stable")  # sorted reads are kinder to the page cache
            out[sel[order]] = self.shard(int(i))[local[order]]
        return out.reshape(*rows.shape, self.dim)

    def read_all(self) -> np.ndarray:
        """Every row in one array (for small galleries and tests; the point of shards is not to need this)."""
        out = np.empty((self.rows, self.dim), dtype=np.float32)
        for start, chunk in self.iter_chunks():
            out[start : start + chunk.shape[0]] = chunk
        return out

    def items(self) -> list[dict[str, Any]]:
        """One record per global row (``{"id": ...}`` for the legacy layout)."""
        out: list[dict[str, Any]] = []
        for info in self.shards:
            if info.items is not None:
                path = self.directory / info.items
                records = _read_items(path)
            elif info.ids is not None and info.ids.endswith(".npy"):  # capret-extract: a numpy unicode array
                path = self.directory / info.ids
                records = [{"id": str(v)} for v in np.load(path, allow_pickle=False).tolist()]
            elif info.ids is not None:  # older capret-extract folders: one id per line
                path = self.directory / info.ids
                records = [{"id": line} for line in path.read_text().splitlines() if line]
            else:
                raise DataError(
                    f"shard {info.name} names neither an items nor an ids file", path=self.directory
                )
            if len(records) != info.rows:
                raise DataError(f"{len(records)} records for {info.rows} rows", path=path)
            out.extend(records)
        return out

    def verify(self) -> None:
        """Check every shard's features and items files against the SHA-256 of the manifest, streaming each file
        once (files of folders written before the items checksum existed are checked as far as recorded).

        Raises:
            DataError: naming the first shard file that is missing or differs.
        """
        checksums: dict[str, str] = {}
        for info in self.shards:
            if info.sha256 is not None:
                checksums[info.features] = info.sha256
            if info.items is not None and info.items_sha256 is not None:
                checksums[info.items] = info.items_sha256
        verify_files(self.directory, checksums, what="feature shard", listed_in=self.manifest_name)
        self.verified = True


def _read_items(path: Path) -> list[dict[str, Any]]:
    """The item records of a shard (one JSON object per line); a bad line is a DataError naming file and line."""
    records = []
    for number, line in enumerate(read_text(path, what="item records").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"line {number} is not valid JSON ({exc.msg}, column {exc.colno})", path=path
            ) from None
        if not isinstance(record, dict) or "id" not in record:
            raise DataError(f"line {number} is not an item record (an object with an id)", path=path)
        records.append(record)
    return records


def open_features(directory: str | Path, *, verify: bool = True) -> ShardedFeatures:
    """Open a features folder: its merged ``manifest.json``, else the rank manifests merged in memory.

    ``verify`` checks every shard against its SHA-256 before anything is read (once per opening; the result is
    :attr:`ShardedFeatures.verified`); ``verify=False`` is the explicit way to skip it (``--no-verify``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError("sharded features folder does not exist", path=directory)
    path = directory / MANIFEST
    if path.is_file():
        features = ShardedFeatures(directory, _read_json(path))
    else:
        features = ShardedFeatures(directory, _merged(directory), manifest_name="manifest_r*.json")
    if verify:
        features.verify()
    return features


# ------------------------------------------------------------------------------------------------ indexes


def _read_rows(features: ShardedFeatures, rows: np.ndarray) -> np.ndarray:
    """Sorted global ``rows`` read shard by shard (each shard mapped only while it is read)."""
    out = np.empty((rows.shape[0], features.dim), dtype=np.float32)
    which = np.searchsorted(features.offsets, rows, side="right") - 1
    for i in np.unique(which):
        sel = np.nonzero(which == i)[0]
        array = features._open(int(i))
        out[sel] = array[rows[sel] - features.offsets[i]]
        del array
    return out


def build_ivf_from_shards(
    features: ShardedFeatures,
    out_dir: str | Path,
    *,
    on_disk: bool = True,
    chunk_rows: int = 65_536,
    progress: bool = False,
    **options: Unpack[IvfpqOptions],
) -> Path:
    """Train an IVF-PQ index on a sample of ``features`` and add them shard by shard; see the module docstring.

    ``options`` are those of the in-memory ``ivfpq`` index, with the same defaults and checks
    (:func:`capret.retrieval.index.ivfpq_options`). Writes ``out_dir/ivf.index`` (+ ``lists.ivfdata`` when
    ``on_disk``) and ``out_dir/index.json`` (settings and the features folder, relative when it lies inside
    ``out_dir``'s parent). Ids are global row numbers.
    """
    ivf = ivfpq_options(options)
    nlist, nbits = ivf["nlist"], ivf["nbits"]
    out_dir = Path(out_dir)
    if features.rows < nlist:
        raise CapretError(
            f"an IVF index with nlist={nlist} needs at least {nlist} vectors, got {features.rows}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    index = ivfpq_factory(features.dim, nlist=nlist, m=ivf["m"], nbits=nbits)
    index.train(_read_rows(features, training_rows(features.rows, ivf["max_train"])))
    parts_dir = out_dir / "parts.tmp"
    if parts_dir.exists():
        shutil.rmtree(parts_dir)
    part_files: list[str] = []
    bar = tqdm(total=features.rows, desc="index shards", unit="row", disable=not progress)
    target = faiss.clone_index(index) if on_disk else index
    current = -1
    for start, chunk in features.iter_chunks(chunk_rows):
        shard = int(np.searchsorted(features.offsets, start, side="right") - 1)
        if on_disk and shard != current:
            if current >= 0:  # the previous shard's part is complete
                part_files.append(_write_part(target, parts_dir, current))
                target = faiss.clone_index(index)
            current = shard
        target.add_with_ids(chunk, np.arange(start, start + chunk.shape[0], dtype=np.int64))
        bar.update(chunk.shape[0])
    bar.close()
    if on_disk:
        if current >= 0:
            part_files.append(_write_part(target, parts_dir, current))
        from faiss.contrib.ondisk import merge_ondisk

        lists = out_dir / "lists.ivfdata"
        lists.unlink(missing_ok=True)
        merge_ondisk(index, part_files, str(lists))
        shutil.rmtree(parts_dir)
    faiss.write_index(index, str(out_dir / "ivf.index"))
    files = ["ivf.index", "lists.ivfdata"] if on_disk else ["ivf.index"]
    settings = {
        "format": "capret-sharded-ivf",
        "version": 1,
        "features": _portable(features.directory, out_dir),
        "rows": features.rows,
        "dim": features.dim,
        "nlist": int(nlist),
        "m": int(faiss.downcast_index(faiss.extract_index_ivf(index)).pq.M),  # type: ignore[attr-defined]
        "nbits": int(nbits),
        "nprobe": int(ivf["nprobe"]),
        "refine_factor": int(ivf["refine_factor"]),
        "max_train": int(ivf["max_train"]),
        "on_disk": bool(on_disk),
        "sha256": {name: _sha256(out_dir / name) for name in files},
    }
    atomic_write_json(out_dir / "index.json", settings, indent=1)
    return out_dir


def _portable(target: Path, base: Path) -> str:
    """``target`` relative to ``base`` when both lie under ``base``'s parent (a gallery folder moved or copied as
    a whole keeps working), else absolute."""
    target, base = target.resolve(), base.resolve()
    if target.is_relative_to(base.parent):
        return os.path.relpath(target, base)
    return str(target)


def _write_part(index: Any, parts_dir: Path, shard: int) -> str:
    parts_dir.mkdir(parents=True, exist_ok=True)
    path = parts_dir / f"part_{shard:05d}.index"
    faiss.write_index(index, str(path))
    return str(path)


class ShardedIVFIndex:
    """Search an index written by :func:`build_ivf_from_shards`: IVF-PQ shortlist, exact re-scoring from shards.

    Follows the :class:`capret.retrieval.index.Index` search contract (``(scores, ids)`` best first, ``-1`` /
    ``-inf`` padding); ids are global row numbers of the features folder. It is read-only: to add vectors, write
    more shards and build again.
    """

    kind = "ivfpq-sharded"

    def __init__(
        self,
        directory: str | Path,
        *,
        features: ShardedFeatures | None = None,
        nprobe: int | None = None,
        refine_factor: int | None = None,
        verify: bool = True,
    ) -> None:
        self.directory = Path(directory)
        settings_path = self.directory / "index.json"
        if not settings_path.is_file():
            raise DataError("not a sharded IVF index folder (no index.json)", path=self.directory)
        self.settings = _read_json(settings_path)
        if int(self.settings.get("version", 1)) > 1:
            raise DataError(f"index version {self.settings['version']} is newer than this capret reads (1)",
                            path=settings_path)  # fmt: skip
        if verify:  # once per opening, before faiss maps anything
            verify_files(self.directory, dict(self.settings.get("sha256") or {}), what="index file",
                         listed_in="index.json")  # fmt: skip
        if features is None:
            features = open_features(self.directory / self.settings["features"], verify=verify)
        self.features = features
        if self.features.rows != int(self.settings["rows"]):
            raise DataError(
                f"index holds {self.settings['rows']} rows, features folder {self.features.directory} has "
                f"{self.features.rows}; rebuild the index",
                path=settings_path,
            )
        self.dim = int(self.settings["dim"])
        # IO_FLAG_ONDISK_SAME_DIR: look for lists.ivfdata beside ivf.index, so the folder can be moved.
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if self.settings.get("on_disk") else 0
        self._index = faiss.read_index(str(self.directory / "ivf.index"), flags)
        self.nprobe = int(nprobe if nprobe is not None else self.settings["nprobe"])
        self.refine_factor = int(
            refine_factor if refine_factor is not None else self.settings["refine_factor"]
        )
        faiss.extract_index_ivf(self._index).nprobe = self.nprobe

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_float32(queries, dim=self.dim, what="queries")
        if int(k) <= 0:
            raise ConfigError(f"k must be a positive integer, got {k}")
        shortlist = int(k) * max(1, self.refine_factor)
        pq_scores, ids = self._index.search(q, shortlist)
        if self.refine_factor:
            vectors = self.features.gather(ids)  # [Q, S, D]; -1 slots give zero rows, masked below
            scores = np.einsum("qd,qsd->qs", q, vectors).astype(np.float32)
        else:
            scores = pq_scores.astype(np.float32)
        scores[ids < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, : int(k)]
        top_scores = np.take_along_axis(scores, order, 1)
        top_ids = np.take_along_axis(ids, order, 1).astype(np.int64)
        if top_ids.shape[1] < int(k):  # fewer candidates than k (tiny galleries): pad like faiss
            pad = int(k) - top_ids.shape[1]
            top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
            top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_ids[~np.isfinite(top_scores)] = -1
        return top_scores, top_ids
