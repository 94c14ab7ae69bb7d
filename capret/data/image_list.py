"""Image lists for extraction and gallery building: paths under one declared root, ids that are relative names.

``--images`` is a folder (every image below it, sorted) or a text file of image paths, one per line, optionally
followed by a tab and an id. Every image must lie under one *root* -- the folder itself, or for a list file the
list's own folder unless ``--root`` declares another -- and both the ids and the stored image paths are relative to
it. Two reasons:

- ids are names, not locations: an absolute path as an id leaks the machine's layout through ``/api/gallery``, is
  refused by the server's id rule, and changes when the data moves;
- a gallery or quickstart folder copied (data and all) elsewhere must still find its photos, so the paths it
  stores are relative to a root it records, never absolute.

A symbolic link whose target lies outside the root is refused unless ``follow_symlinks`` (``--follow-symlinks``)
says so: a folder someone else can write into must not make the run read, embed and serve any file of the
machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from capret.data.image_sources import IMAGE_SUFFIXES, check_inside_root
from capret.errors import DataError, MissingFileError

__all__ = ["ImageList", "check_inside_root", "list_images"]


@dataclass(frozen=True)
class ImageList:
    """Images to embed: their paths, unique ids, and the root both are relative to."""

    paths: list[Path]
    ids: list[str]
    root: Path

    def relative(self, path: Path) -> str:
        """``path`` relative to :attr:`root`, with ``/`` separators (what a gallery stores)."""
        return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(self.root))).as_posix()


def list_images(source: Path, *, root: Path | None = None, follow_symlinks: bool = False) -> ImageList:
    """Image paths and ids from a folder or a list file (see the module docstring).

    Folder: ids are the paths relative to the root without the suffix. List file: relative paths are relative to
    the root; the id is the text after a tab, else the path relative to the root.

    Raises:
        MissingFileError: the source, or a listed image, does not exist.
        DataError: an image outside the root, an empty list, duplicate ids.
    """
    source = Path(source)
    if source.is_dir():
        base = Path(root) if root is not None else source
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise MissingFileError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {source}", path=source)
        for path in paths:
            check_inside_root(path, base, follow_symlinks=follow_symlinks, where=f"--images {source}")
        listed = ImageList(paths=paths, ids=[], root=base)
        ids = [str(Path(listed.relative(p)).with_suffix("").as_posix()) for p in paths]
        return ImageList(paths=paths, ids=ids, root=base)
    if not source.is_file():
        raise MissingFileError(f"--images {source} is neither a folder nor a list file", path=source)
    base = Path(root) if root is not None else source.parent
    listed = ImageList(paths=[], ids=[], root=base)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text (byte {exc.start}: {exc.reason})", path=source) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        path_text, _, ident = line.partition("\t")
        path = Path(path_text.strip())
        if not path.is_absolute():
            path = base / path
        where = f"{source}:{number}"
        if not path.is_file():
            raise MissingFileError(f"{where}: image {path} does not exist", path=None)
        check_inside_root(path, base, follow_symlinks=follow_symlinks, where=where)
        listed.paths.append(path)
        listed.ids.append(ident.strip() or listed.relative(path))
    if not listed.paths:
        raise DataError("lists no image", path=source)
    seen: dict[str, int] = {}
    for position, ident in enumerate(listed.ids):
        if ident in seen:
            raise DataError(f"image id {ident!r} is listed twice (entries {seen[ident] + 1} and {position + 1})",
                            path=source)  # fmt: skip
        seen[ident] = position
    return listed
