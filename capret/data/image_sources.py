"""Unlabeled image collections for the zero-shot CIR methods: a folder tree or webdataset tar shards.

SEARLE's phi and OTI and Pic2Word train on images alone (ImageNet test / Conceptual Captions in the papers).
An :class:`ImageSource` lists image *keys* (stable names: the path relative to the folder, or
``<shard>/<member>`` inside a tar shard) and opens one key on demand, so a collection of millions of images
is listed once and read lazily, and feature caches and pseudo-token stores can be keyed by the same names.

Webdataset shards are plain tar files whose members are grouped by basename (``000123.jpg``,
``000123.txt``, ...); the image members are indexed once with :mod:`tarfile` and read by random access, so
training batches stay deterministic given ``(rank, world_size, epoch, seed)`` as the trainer requires.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from capret.data.transforms import open_image
from capret.errors import BadImageError, DataError

__all__ = ["IMAGE_SUFFIXES", "ImageSource", "check_inside_root", "open_image_source"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def check_inside_root(path: Path, root: Path, *, follow_symlinks: bool, where: str = "") -> None:
    """Refuse ``path`` when it lies outside ``root``, by its name or, through a symbolic link, by its target.

    A folder someone else can write into must not make a run read (and embed, caption or serve) any file of the
    machine through a link, so links that leave the root need an explicit ``follow_symlinks``.

    Raises:
        DataError: naming the path (and ``where`` it was listed), the root, and the option that allows links.
    """
    prefix = f"{where}: " if where else ""
    absolute, base = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    if not absolute.is_relative_to(base):
        raise DataError(
            f"{prefix}image {path} lies outside the image root {root}; declare a --root that holds every image"
        )
    if follow_symlinks:
        return
    target = absolute.resolve()
    if not target.is_relative_to(base.resolve()):
        raise DataError(
            f"{prefix}image {path} is a symbolic link to {target}, outside the image root {root}; pass "
            "--follow-symlinks to read it anyway"
        )


class ImageSource:
    """Named images from a folder (recursively) or from ``*.tar`` webdataset shards (keys sorted)."""

    def __init__(self, root: str | Path, *, limit: int | None = None, follow_symlinks: bool = False) -> None:
        self.root = Path(root)
        if self.root.is_dir():
            shards = sorted(self.root.rglob("*.tar"))
            files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            for path in [*shards, *files]:  # a link out of the folder is read only when allowed
                check_inside_root(path, self.root, follow_symlinks=follow_symlinks, where=str(self.root))
        elif self.root.is_file() and self.root.suffix == ".tar":
            shards, files = [self.root], []
        else:
            raise DataError(
                "image source must be a folder of images or of .tar shards, or one .tar", path=root
            )
        self._members: dict[str, tuple[Path, str]] = {}
        for shard in shards:
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                        rel = shard.relative_to(self.root) if shard != self.root else Path(shard.name)
                        self._members[f"{rel.as_posix()}/{member.name}"] = (shard, member.name)
        keys = [p.relative_to(self.root).as_posix() for p in files] + sorted(self._members)
        if not keys:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found", path=root)
        self.keys: list[str] = keys[:limit] if limit else keys

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, key: str) -> Image.Image:
        """The RGB image of ``key``; an unknown key or an unreadable image raises naming it."""
        if key in self._members:
            shard, member = self._members[key]
            try:
                with tarfile.open(shard) as tar:
                    handle = tar.extractfile(member)
                    if handle is None:
                        raise BadImageError(f"member {member!r} cannot be read", path=shard)
                    data = handle.read()
                with Image.open(io.BytesIO(data)) as image:
                    return image.convert("RGB")
            except (OSError, tarfile.TarError) as exc:
                raise BadImageError(f"member {member!r}: {exc}", path=shard) from exc
        path = self.root / key
        if not path.is_file():
            raise DataError(f"image key {key!r} is not in this source", path=self.root)
        return open_image(path)

    def subset(self, keys: Sequence[str]) -> list[str]:
        """``keys`` restricted to this source, in the given order (unknown keys are an error)."""
        known = set(self.keys)
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise DataError(
                f"{len(unknown)} key(s) not in the image source, e.g. {unknown[0]!r}", path=self.root
            )
        return list(keys)


def open_image_source(
    root: str | Path, *, limit: int | None = None, follow_symlinks: bool = False
) -> ImageSource:
    """:class:`ImageSource` of a folder of images, a folder of tar shards, or one tar shard; symbolic links that
    leave the folder are refused unless ``follow_symlinks``."""
    return ImageSource(root, limit=limit, follow_symlinks=follow_symlinks)
