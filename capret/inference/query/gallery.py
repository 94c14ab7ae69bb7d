"""The gallery side of the query pipeline, built once: items, captions, features and an index, in one folder.

``capret index build`` calls :func:`build_gallery`, which detects the items of every shop photo (or takes the
whole photo), captions them (optional), embeds them with the trained model and writes them as sharded features
(:mod:`capret.retrieval.sharded`), then indexes them. Layout of the folder::

    OUT/gallery.json            what was built: model, detector, captioner, index kind and options, counts
    OUT/features/               sharded features + items_*.jsonl (id, image, box, score, category_id, caption)
    OUT/captions.jsonl          the gallery caption store (resumable like every caption store)
    OUT/index.faiss             flat / exact index over all rows (ids = global row numbers), or
    OUT/index/                  a sharded IVF-PQ index (ivf.index, lists.ivfdata, index.json)

Resuming: shards are made of ``shard_images`` consecutive images of this rank's list; a shard listed in the
rank manifest is never redone, and captions already in the store are never asked again, so re-running the same
command after an interruption continues where it stopped. Under ``torchrun`` rank ``r`` takes images ``r, r + W,
...``; the caller merges the manifests and builds the index once every rank is done (:func:`finish_gallery`).

:class:`Gallery` opens such a folder for searching.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from capret.data.imagefile import decode_image
from capret.errors import ConfigError, DataError, OutputFolderError, UnknownNameError
from capret.inference.dualstream.extract import check_finite_rows
from capret.io import atomic_write_json, file_sha256, read_json
from capret.retrieval.index import create_index, load_index
from capret.retrieval.sharded import (
    ShardedFeatures,
    ShardedIVFIndex,
    ShardWriter,
    build_ivf_from_shards,
    merge_manifests,
    open_features,
    verify_files,
)

__all__ = ["GALLERY_FILE", "Gallery", "build_gallery", "clear_gallery", "finish_gallery"]

GALLERY_FILE = "gallery.json"
GALLERY_VERSION = 1
INDEX_KINDS = ("flat", "exact", "ivfpq")


def _list_digest(ids: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]


def _refuse_another_build(out: Path, meta: dict[str, Any]) -> None:
    """Resuming continues the same build only: features of another model (or detector, captioner, image list)
    in ``out`` would be mixed with this run's rows in one index, so the build stops and names what differs."""
    for path in sorted((out / "features").glob("manifest*.json")):
        try:
            old = json.loads(path.read_text()).get("meta", {})
        except (OSError, ValueError, AttributeError):
            continue  # unreadable manifests are reported by the shard writer itself
        differ = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if differ:
            what = "; ".join(f"{k}: {old.get(k)!r} -> {meta.get(k)!r}" for k in differ)
            raise OutputFolderError(
                f"holds a gallery of another build ({what}); pass --overwrite to rebuild it, or use a new --out",
                path=out,
            )


def clear_gallery(out: str | Path) -> list[str]:
    """Delete what a gallery build writes in ``out`` (``--overwrite``); other files there are left alone.

    Returns the names removed.
    """
    out = Path(out)
    removed = []
    for name in (GALLERY_FILE, "features", "index", "index.faiss"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    for path in sorted(out.glob("captions*.jsonl")):
        path.unlink()
        removed.append(path.name)
    return removed


def build_gallery(
    model: Any,
    *,
    images: Sequence[Path],
    ids: Sequence[str],
    out: str | Path,
    detector: Any = None,
    captioner: Any = None,
    model_ref: str = "",
    rank: int = 0,
    world_size: int = 1,
    shard_images: int = 512,
    batch_size: int = 32,
    progress: bool = True,
    image_root: str | Path | None = None,
) -> dict[str, Any]:
    """Embed this rank's share of ``images`` into shards under ``out/features`` (see the module docstring).

    Args:
        model: a :class:`~capret.inference.dualstream.encoding.RetrievalModel`.
        images, ids: gallery photos and their unique ids (item ids are ``"<image id>/<n>"``); ids are names, so
            an absolute path is refused.
        image_root: the folder every image lies under; item records store image paths relative to it and
            :func:`finish_gallery` records it relative to the gallery folder, so a copied folder tree keeps
            working. ``None``: paths are stored as given (absolute after resolution), for in-memory images.
        detector: a detector (:mod:`capret.inference.detectors`); ``None`` = whole image.
        captioner: a :class:`~capret.inference.query.captioner.Captioner`; ``None`` = image-only features.
        model_ref: how the model was named (recorded; a resumed run must name the same).
    Returns:
        Counts of this rank: images, items, shards written / skipped, items without caption.
    """
    from capret.inference.detectors import WholeImageDetector, run_detector

    if len(images) != len(ids) or len(set(ids)) != len(ids):
        raise DataError(
            f"need one unique id per image, got {len(images)} images and {len(set(ids))} unique ids"
        )
    if shard_images < 1:
        raise ConfigError(f"shard_images must be >= 1, got {shard_images}")
    absolute = [i for i in ids if Path(i).is_absolute() or Path(i).drive]
    if absolute:
        raise DataError(
            f"gallery ids are names, not paths: {absolute[0]!r} is absolute; give ids relative to the image root"
        )
    out = Path(out)
    root = Path(os.path.abspath(image_root)) if image_root is not None else None

    def stored(path: Path) -> str:
        if root is None:
            return str(Path(os.path.abspath(path)))
        relative = Path(os.path.relpath(os.path.abspath(path), root))
        if relative.parts[:1] == ("..",):
            raise DataError(f"image {path} lies outside the gallery's image root {root}")
        return relative.as_posix()

    stored_images = [stored(p) for p in images]
    detector = detector or WholeImageDetector()
    describe = getattr(detector, "describe", None)
    meta = {
        "model": model_ref,
        "detector": describe() if callable(describe) else type(detector).__name__,
        "captioner": captioner.backend.describe() | {"backend": captioner.name} if captioner else None,
        "images": _list_digest(list(ids)),
        "shard_images": int(shard_images),
    }
    if root is not None:  # finish_gallery records where the relative image paths start
        meta["image_root"] = str(root)
    _refuse_another_build(out, meta)
    writer = ShardWriter(out / "features", rank=rank, world_size=world_size, dim=model.embed_dim, meta=meta)
    mine = list(range(rank, len(images), world_size))
    summary = {"rank": rank, "images": len(mine), "items": 0, "shards_written": 0, "shards_skipped": 0}
    summary["items_without_caption"] = 0
    bar = tqdm(total=len(mine), desc=f"gallery r{rank}", unit="image", disable=not progress)
    for shard, start in enumerate(range(0, len(mine), shard_images)):
        chunk = mine[start : start + shard_images]
        if writer.done(shard):
            summary["shards_skipped"] += 1
            summary["items"] += writer.shards[shard].rows
            bar.update(len(chunk))
            continue
        pictures = []
        for i in chunk:
            pictures.append(decode_image(images[i]))  # BadImageError / MissingImageError naming the file
        detections = run_detector(detector, pictures, [images[i] for i in chunk])
        owners, boxes, records = [], [], []
        for local, (i, dets) in enumerate(zip(chunk, detections)):
            for n, det in enumerate(dets):
                owners.append(local)
                boxes.append(tuple(float(v) for v in det.box))
                records.append(
                    {"id": f"{ids[i]}/{n}", "image": stored_images[i], **det.to_dict(), "caption": None}
                )
        captions: list[str | None] | None = None
        if captioner is not None and records:
            captions = captioner.caption(
                [pictures[o] for o in owners],
                boxes,
                category_ids=[r["category_id"] for r in records],
            )
            for record, caption in zip(records, captions):
                record["caption"] = caption
            summary["items_without_caption"] += sum(c is None for c in captions)
        feats = (
            model.encode_images([pictures[o] for o in owners], captions, boxes=boxes, batch_size=batch_size)
            if records
            else np.zeros((0, model.embed_dim), np.float32)
        )
        check_finite_rows(np.asarray(feats), model=model_ref or "model", ids=[r["id"] for r in records])
        writer.write(shard, feats, records, span=(start, start + len(chunk)))
        summary["items"] += len(records)
        summary["shards_written"] += 1
        bar.update(len(chunk))
    bar.close()
    return summary


def finish_gallery(
    out: str | Path,
    *,
    index: str = "flat",
    index_options: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Merge the rank manifests and index every row (run once, after all ranks finished); writes gallery.json."""
    if index not in INDEX_KINDS:
        raise ConfigError(f"unknown gallery index {index!r}; valid: {', '.join(INDEX_KINDS)}")
    out = Path(out)
    merge_manifests(out / "features")
    features = open_features(out / "features")
    options = dict(index_options or {})
    if features.rows == 0:
        raise DataError("the gallery holds no item (no detection in any image?)", path=out / "features")
    if index == "ivfpq":
        build_ivf_from_shards(features, out / "index", progress=progress, **options)
    else:
        flat = create_index(index, features.dim, **options)
        for start, chunk in features.iter_chunks():
            flat.add(chunk, np.arange(start, start + chunk.shape[0], dtype=np.int64))
        flat.save(out / "index.faiss")
    checksums = {} if index == "ivfpq" else {"index.faiss": file_sha256(out / "index.faiss")}
    gallery = {
        "format": "capret-gallery",
        "version": GALLERY_VERSION,
        "rows": features.rows,
        "dim": features.dim,
        "index": {"kind": index, "options": options},
        "sha256": checksums,  # the ivfpq index folder records its own (index/index.json)
        "build": features.meta,
        **(settings or {}),
    }
    if features.meta.get("image_root"):
        # relative first (a folder tree copied elsewhere finds its own photos), absolute as the fallback (a gallery
        # folder copied alone still finds the original photos)
        absolute_root = str(features.meta["image_root"])
        gallery["image_root"] = Path(os.path.relpath(absolute_root, out.resolve())).as_posix()
        gallery["image_root_absolute"] = absolute_root
    atomic_write_json(out / GALLERY_FILE, gallery, indent=1)
    return gallery


class Gallery:
    """A built gallery folder opened for search: index, memory-mapped features, and one record per row.

    Opening verifies every checksummed file (feature shards, item records, the index) once, streaming each file:
    a flipped byte is refused with the file's name before any score is computed. ``verify=False`` skips the
    check explicitly (``capret search --no-verify``); :attr:`verified` says which happened.
    """

    def __init__(self, directory: str | Path, *, device: str | None = None, verify: bool = True) -> None:
        self.directory = Path(directory)
        path = self.directory / GALLERY_FILE
        if not path.is_file():
            raise DataError(
                f"not a gallery folder (no {GALLERY_FILE}); build one with `capret index build`", path=path
            )
        self.settings = _read_settings(path)
        self.verified = bool(verify)
        if verify:
            verify_files(self.directory, self.settings.get("sha256") or {}, what="gallery file",
                         listed_in=GALLERY_FILE)  # fmt: skip
        self.features: ShardedFeatures = open_features(self.directory / "features", verify=verify)
        self.items = self.features.items()
        #: the folder the items' relative image paths start from (None: galleries that store absolute paths)
        self.image_root = _image_root(self.directory, self.settings)
        if self.image_root is not None:
            for item in self.items:
                item["image"] = os.path.normpath(self.image_root / str(item["image"]))
        self._rows = {str(item["id"]): row for row, item in enumerate(self.items)}
        kind = self.settings["index"]["kind"]
        self.index: Any
        if kind == "ivfpq":
            self.index = ShardedIVFIndex(self.directory / "index", features=self.features, verify=verify)
        else:
            self.index = load_index(self.directory / "index.faiss", device=device)
        if self.index.ntotal != self.features.rows:
            raise DataError(
                f"index holds {self.index.ntotal} rows, features {self.features.rows}; rebuild the index",
                path=path,
            )

    @property
    def dim(self) -> int:
        return self.features.dim

    def __len__(self) -> int:
        return self.features.rows

    def row_of(self, item_id: str) -> int:
        """Global row of a gallery item id (``"<image id>/<n>"``); unknown ids are an error naming one valid id."""
        if item_id not in self._rows:
            example = next(iter(self._rows), "")
            raise UnknownNameError(
                f"gallery item {item_id!r} not found (ids look like {example!r})", path=self.directory
            )
        return self._rows[item_id]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` of the top-``k`` gallery rows per query (``-1`` rows pad small galleries)."""
        return self.index.search(queries, min(int(k), len(self)))


def _read_settings(path: Path) -> dict[str, Any]:
    """``gallery.json``, checked: a JSON object of a known format and version with an index kind we build."""
    settings = read_json(path, what="gallery settings")
    if not isinstance(settings, dict):
        raise DataError("a gallery settings file is a JSON object", path=path)
    if settings.get("format", "capret-gallery") != "capret-gallery":
        raise DataError(f"format {settings.get('format')!r} is not 'capret-gallery'", path=path)
    version = settings.get("version", GALLERY_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= GALLERY_VERSION:
        raise DataError(
            f"unknown version {version!r}; this capret reads version 1 to {GALLERY_VERSION}", path=path
        )
    index = settings.get("index")
    if not isinstance(index, dict) or index.get("kind") not in INDEX_KINDS:
        kind = index.get("kind") if isinstance(index, dict) else index
        raise DataError(f"index kind {kind!r} is not one of {', '.join(INDEX_KINDS)}", path=path)
    if not isinstance(settings.get("sha256", {}), dict):
        raise DataError("sha256 must map file names to hex digests", path=path)
    return settings


def _image_root(directory: Path, settings: dict[str, Any]) -> Path | None:
    """Where the relative image paths of a gallery start: ``image_root`` relative to the gallery folder when that
    folder exists (the data was copied along), else ``image_root_absolute`` (the gallery alone was copied)."""
    relative = settings.get("image_root")
    if relative is None:
        return None
    candidate = Path(os.path.normpath(directory / str(relative)))
    absolute = settings.get("image_root_absolute")
    if candidate.is_dir() or absolute is None or not Path(str(absolute)).is_dir():
        return candidate
    return Path(str(absolute))
