"""Growing and changing a catalogue: add photos, update an item's photo or caption, re-embed with a new model.

**Adding** (:func:`add_images`) first *plans*: each photo must lie under the catalogue's declared root (rows
store the path relative to it); its SHA-256 decides what happens:

- same path, same bytes as a row already there: *present* (skipped; this is how a rerun after ``kill -9`` adds
  exactly the missing photos);
- same path, other bytes: *changed* (skipped and reported: replace it with ``update --image``);
- same bytes as another photo in the catalogue or earlier in this call: *duplicate* (skipped, reported);
- otherwise added, and reported as a *near duplicate* when its perceptual hash is within
  ``near_duplicate_bits`` of a photo already there (see :mod:`capret.catalogue.schema`).

Then an *engine* runs the model stages (detect -> caption -> embed, :class:`~capret.catalogue.stages.ItemStages`)
over batches of photos, and the writer commits each batch of rows as one table version. Engines are a registry:
``local`` (this process) and ``ray`` (:mod:`capret.catalogue.ray_engine`, Ray Data actors; the writer stays here).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm.auto import tqdm

from capret.catalogue.schema import dhash, hamming, model_fingerprint, row_schema
from capret.catalogue.stages import ImageJob, ItemStages, utc_now
from capret.catalogue.table import Catalogue, CatalogueError, sql_string
from capret.data.imagefile import decode_image
from capret.errors import CheckpointError, ConfigError, DataError
from capret.io import file_sha256
from capret.registry import Registry

__all__ = [
    "CatalogueEngine",
    "LocalEngine",
    "add_images",
    "create_engine",
    "expand_photos",
    "list_engines",
    "plan_images",
    "read_list",
    "reembed",
    "register_engine",
    "relative_to_root",
    "update_caption",
    "update_image",
]


class CatalogueEngine(Protocol):
    """Runs the model stages over photo batches and yields row tables, each holding whole photos only."""

    def rows(
        self, catalogue: Catalogue, jobs: Sequence[ImageJob], *, batch_images: int
    ) -> Iterator[pa.Table]: ...


_ENGINES: Registry[CatalogueEngine] = Registry(
    "catalogue engine", lazy_modules={"ray": "capret.catalogue.ray_engine"}
)


def register_engine(name: str) -> Callable[[Callable[..., CatalogueEngine]], Callable[..., CatalogueEngine]]:
    """Decorator registering an engine factory ``factory(**options) -> CatalogueEngine`` under ``name``."""
    return _ENGINES.register(name)


def create_engine(name: str, **options: Any) -> CatalogueEngine:
    """Build engine ``name`` (``local``, ``ray``); unknown names list the valid ones."""
    return _ENGINES.create(name, **options)


def list_engines() -> list[str]:
    return _ENGINES.names()


@register_engine("local")
class LocalEngine:
    """The model stages in this process, one batch of photos at a time."""

    def __init__(self, *, device: str | None = None) -> None:
        self.device = device

    def rows(
        self, catalogue: Catalogue, jobs: Sequence[ImageJob], *, batch_images: int
    ) -> Iterator[pa.Table]:
        stages = ItemStages(catalogue.settings, caption_cache=catalogue.caption_cache, device=self.device)
        try:
            for start in range(0, len(jobs), batch_images):
                yield stages.rows(jobs[start : start + batch_images])
        finally:
            stages.close()


# ------------------------------------------------------------------------------------------------ planning


def relative_to_root(root: str | Path, path: str | Path) -> str:
    """``path`` relative to ``root`` (POSIX); a photo outside the root is an error naming both."""
    root_path, full = Path(root).resolve(), Path(path).resolve()
    try:
        return full.relative_to(root_path).as_posix()
    except ValueError:
        raise DataError(
            f"photo {full} is not under the catalogue's root {root_path}; rows store paths relative to the "
            "root (move the photo there, or create the catalogue with another --root)",
            path=path,
        ) from None


def plan_images(
    catalogue: Catalogue,
    paths: Sequence[str | Path],
    *,
    categories: Sequence[str | None] | None = None,
) -> tuple[list[ImageJob], dict[str, Any]]:
    """Decide per photo: add, present, changed or duplicate (see the module docstring); hash only what is new."""
    if categories is not None and len(categories) != len(paths):
        raise ValueError(f"{len(categories)} categories for {len(paths)} photos")
    known = catalogue.scan(["image", "image_sha256", "phash"]).to_pydict()
    sha_of_image = dict(zip(known["image"], known["image_sha256"]))
    image_of_sha = dict(zip(known["image_sha256"], known["image"]))
    hash_of_image = dict(zip(known["image"], known["phash"]))
    hash_names = list(hash_of_image)
    hashes = np.asarray([hash_of_image[n] for n in hash_names], dtype=np.int64)
    report: dict[str, Any] = {
        "present": 0,
        "changed": [],
        "duplicates": [],
        "near_duplicates": [],
        "to_add": 0,
    }
    jobs: list[ImageJob] = []
    for n, path in enumerate(paths):
        full = Path(path).resolve()
        if not full.is_file():
            raise DataError("photo to add does not exist", path=path)
        relative = relative_to_root(catalogue.settings.root, full)
        sha = file_sha256(full)
        if relative in sha_of_image:
            if sha_of_image[relative] == sha:
                report["present"] += 1
            else:
                report["changed"].append(relative)
            continue
        if sha in image_of_sha:
            report["duplicates"].append({"image": relative, "of": image_of_sha[sha]})
            continue
        phash = dhash(decode_image(full))
        pool = np.concatenate([hashes, np.asarray([j.phash for j in jobs], dtype=np.int64)])
        if pool.size:
            bits = hamming(phash, pool)
            closest = int(np.argmin(bits))
            if int(bits[closest]) <= catalogue.settings.near_duplicate_bits:
                names = hash_names + [job.relative for job in jobs]
                report["near_duplicates"].append(
                    {"image": relative, "of": names[closest], "bits": int(bits[closest])}
                )
        image_of_sha[sha] = relative
        sha_of_image[relative] = sha
        category = categories[n] if categories is not None else None
        jobs.append(ImageJob(path=str(full), relative=relative, sha256=sha, phash=phash, category=category))
    report["to_add"] = len(jobs)
    return jobs, report


def add_images(
    catalogue: Catalogue,
    paths: Sequence[str | Path],
    *,
    categories: Sequence[str | None] | None = None,
    engine: CatalogueEngine | None = None,
    batch_images: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """Add photos (plan, run the stages, commit whole batches); returns the plan's report plus counts added.

    The writer lock is held for the whole call, so a second writer is refused before anything is read.
    """
    if batch_images < 1:
        raise ConfigError(f"batch_images must be >= 1, got {batch_images}")
    engine = engine or LocalEngine()
    with catalogue.writing():
        check_model(catalogue)
        jobs, report = plan_images(catalogue, paths, categories=categories)
        added_rows, added_images = 0, 0
        bar = tqdm(total=len(jobs), desc="catalogue add", unit="photo", disable=not progress)
        if jobs:
            for table in engine.rows(catalogue, jobs, batch_images=batch_images):
                added_rows += catalogue.add_rows(table)
                photos = len(set(table.column("image").to_pylist()))
                added_images += photos
                bar.update(photos)
        bar.close()
    report.update(added_images=added_images, added_rows=added_rows, rows=len(catalogue))
    return report


def check_model(catalogue: Catalogue) -> None:
    """Refuse to embed with a model whose fingerprint is not the catalogue's (rows would mix spaces)."""
    current = model_fingerprint(catalogue.settings.model)
    if current != catalogue.settings.fingerprint:
        raise CheckpointError(
            f"the catalogue embeds with model fingerprint {catalogue.settings.fingerprint}, but "
            f"{catalogue.settings.model} now has {current}; re-embed every row with "
            "`capret catalogue update DIR --reembed --model M`",
            path=catalogue.settings.model,
        )


# ------------------------------------------------------------------------------------------------ updating


def _one_row(catalogue: Catalogue, item: str) -> dict[str, Any]:
    rows = catalogue.rows([item])
    if not rows:
        raise CatalogueError(f"no item {item!r} in the catalogue {catalogue.location}")
    return rows[0]


def _replace(catalogue: Catalogue, row: dict[str, Any], vector: np.ndarray, **changes: Any) -> None:
    record = {**row, **changes, "vector": np.asarray(vector, np.float32).tolist(), "updated": utc_now()}
    catalogue.replace_rows(pa.Table.from_pylist([record], schema=row_schema(catalogue.settings.dim)))


def update_caption(
    catalogue: Catalogue, item: str, caption: str, *, device: str | None = None, verify: bool = True
) -> dict[str, Any]:
    """Give item ``item`` a caption written by a person and re-embed it with that caption.

    The source photo is checked against the row's SHA-256 first (``verify=False`` skips it): a photo changed
    since it was added would give the row a vector of other bytes.
    """
    if not caption.strip():
        raise DataError("a caption cannot be empty")
    with catalogue.writing():
        check_model(catalogue)
        row = _one_row(catalogue, item)
        stages = ItemStages(catalogue.settings, caption_cache=None, device=device)
        source = catalogue.verified_source(row, verify=verify)
        vector = stages.embed([source], boxes=[row["box"]], captions=[caption])[0]
        _replace(catalogue, row, vector, caption=caption, caption_source="manual")
    return {"id": item, "caption": caption, "caption_source": "manual"}


def update_image(
    catalogue: Catalogue,
    item: str,
    photo: str | Path,
    *,
    box: Sequence[float] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Give item ``item`` a new photo (re-photographed): detect (unless ``box``), caption and embed it again.

    The id stays; the photo's path, hashes, box, caption and vector change. The photo must be under the root.
    """
    with catalogue.writing():
        check_model(catalogue)
        row = _one_row(catalogue, item)
        full = Path(photo).resolve()
        if not full.is_file():
            raise DataError("new photo does not exist", path=photo)
        relative = relative_to_root(catalogue.settings.root, full)
        job = ImageJob(
            path=str(full),
            relative=relative,
            sha256=file_sha256(full),
            phash=dhash(decode_image(full)),
            category=row["category"],
            box=None if box is None else (float(box[0]), float(box[1]), float(box[2]), float(box[3])),
        )
        stages = ItemStages(catalogue.settings, caption_cache=catalogue.caption_cache, device=device)
        try:
            new = stages.rows([job]).slice(0, 1).to_pylist()[0]  # the photo's best item
        finally:
            stages.close()
        keys = ("image", "image_sha256", "phash", "box", "score", "caption", "caption_source")
        changes = {k: new[k] for k in keys}
        _replace(catalogue, row, np.asarray(new["vector"], np.float32), **changes)
    return {"id": item, "image": relative, "caption": changes["caption"]}


def reembed(
    catalogue: Catalogue,
    *,
    model: str | Path | None = None,
    batch_rows: int = 256,
    device: str | None = None,
    progress: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Re-embed every row whose fingerprint is not the (new) model's, from its source photo, box and caption.

    With ``model`` the catalogue switches to it first (same width required); each batch is one commit, so a
    killed run resumes where it stopped (``doctor`` reports the fingerprint mix meanwhile). Each batch's source
    photos are checked against their rows' SHA-256 before anything of the batch is embedded (``verify=False``
    skips it), so a changed photo stops the run naming it, with the batches before it committed.
    """
    from capret.inference.dualstream.encoding import load_model

    with catalogue.writing():
        loaded = None
        if model is not None:
            path = str(Path(model).resolve())
            loaded = load_model(path, device=device)
            if loaded.embed_dim != catalogue.settings.dim:
                raise CheckpointError(
                    f"model embeds {loaded.embed_dim}-d rows, this catalogue holds {catalogue.settings.dim}-d; "
                    "create a new catalogue for it",
                    path=path,
                )
            catalogue.settings.model = path
            catalogue.settings.fingerprint = model_fingerprint(path)
            catalogue.save_settings()
        stages = ItemStages(catalogue.settings, caption_cache=None, device=device, model=loaded)
        fingerprint = catalogue.settings.fingerprint
        where = f"model_fingerprint != {sql_string(fingerprint)}"
        todo = catalogue.scan(["id"], where=where).num_rows
        done = 0
        bar = tqdm(total=todo, desc="re-embed", unit="row", disable=not progress)
        while True:
            batch = catalogue.items.search().where(where).limit(int(batch_rows)).to_arrow().to_pylist()
            if not batch:
                break
            vectors = stages.embed(
                [catalogue.verified_source(r, verify=verify) for r in batch],
                boxes=[r["box"] for r in batch],
                captions=[r["caption"] for r in batch],
            )
            now = utc_now()
            records = [
                {**r, "vector": v.tolist(), "model_fingerprint": fingerprint, "updated": now}
                for r, v in zip(batch, vectors)
            ]
            catalogue.replace_rows(pa.Table.from_pylist(records, schema=row_schema(catalogue.settings.dim)))
            done += len(batch)
            bar.update(len(batch))
        bar.close()
    return {"reembedded": done, "fingerprint": fingerprint, "model": catalogue.settings.model}


def read_list(path: str | Path) -> tuple[list[str], list[str | None]]:
    """A photo list file: one photo per line, optionally ``<TAB>category``; relative paths are relative to the
    list's folder; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError("photo list does not exist", path=path)
    photos: list[str] = []
    categories: list[str | None] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, category = line.partition("\t")
        photo = Path(name.strip())
        photos.append(str(photo if photo.is_absolute() else path.parent / photo))
        categories.append(category.strip() or None)
    return photos, categories


def expand_photos(inputs: Iterable[str | Path]) -> list[str]:
    """Files as given; folders expanded to their image files (sorted, recursively)."""
    suffixes = {e.lower() for e, f in Image.registered_extensions().items() if f in Image.OPEN}
    out: list[str] = []
    for entry in inputs:
        entry = Path(entry)
        if entry.is_dir():
            for dirpath, _, files in sorted(os.walk(entry)):
                out.extend(
                    str(Path(dirpath) / f) for f in sorted(files) if Path(f).suffix.lower() in suffixes
                )
        else:
            out.append(str(entry))
    return out
