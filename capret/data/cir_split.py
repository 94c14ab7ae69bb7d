"""What the composed-retrieval benchmark readers (:mod:`.fashioniq`, :mod:`.cirr`, :mod:`.circo`) share.

Each reader parses its own annotation files and knows where its images lie; once parsed, a split is a list of
queries, each with a ``reference`` image name, and the rest is the same for every benchmark: its length, its
items, opening an image, the reference images the captioner must describe (keys ``<benchmark>/<name>/0``,
DESIGN.md) and its ``repr``. Keeping those here means a fourth benchmark gets them by naming its images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from PIL import Image

from capret.data.transforms import open_image

__all__ = ["CIRSplit"]


class _Query(Protocol):
    @property
    def reference(self) -> Any: ...


QueryT = TypeVar("QueryT", bound=_Query)


class CIRSplit(Generic[QueryT]):
    """One split of a composed-retrieval benchmark: ``queries`` (parsed by the subclass), ``len()`` of them.

    Subclasses set ``name`` (the caption-key prefix), ``root``, ``split`` and ``queries`` and implement
    :meth:`image_path`.
    """

    name: ClassVar[str]
    root: Path
    split: str
    queries: list[QueryT]

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> QueryT:
        return self.queries[index]

    def image_path(self, name: Any) -> Path:
        """Where image ``name`` lies (each benchmark names and stores its images its own way)."""
        raise NotImplementedError

    def load_image(self, name: Any) -> Image.Image:
        """Open image ``name`` as RGB; a missing image raises ``FileNotFoundError`` naming the file."""
        return open_image(self.image_path(name))

    def images_to_caption(self) -> list[tuple[str, Path]]:
        """Unique reference images of the split as ``(key, path)``, key ``<name>/<image>/0`` (DESIGN.md)."""
        seen = dict.fromkeys(q.reference for q in self.queries)
        return [(f"{self.name}/{name}/0", self.image_path(name)) for name in seen]

    def _repr_fields(self) -> dict[str, str]:
        return {"split": self.split}

    def __repr__(self) -> str:
        fields = "".join(f", {key}={value!r}" for key, value in self._repr_fields().items())
        return f"{type(self).__name__}(root={str(self.root)!r}{fields}, n={len(self)})"
