"""Dataset readers, and the dataset registry (``create_dataset(name, root=..., split=...)``).

Readers: :mod:`.deepfashion2` (items, boxes, the official ground-truth files), :mod:`.demo` (the quickstart's
DeepFashion2-layout set cut from scikit-image photographs), :mod:`.fashioniq`, :mod:`.cirr`, :mod:`.circo`
(composed image retrieval triplets); :mod:`.items` (item crops, P x K batches), :mod:`.transforms` (CLIP
padding and item transforms), :mod:`.captions` / :mod:`.caption_records` (joining caption stores to items).

Every reader builds from annotation files alone and opens images lazily. The registry lets configs and CLIs
name a dataset instead of importing its module (the training tasks build their data through it, and CLI
``--dataset`` choices come from :func:`list_datasets`); modules are imported on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from capret.errors import ConfigError
from capret.registry import Registry

__all__ = ["create_dataset", "list_datasets", "register_dataset"]

_DATASETS: Registry[Any] = Registry("dataset")
#: dataset name -> kind: ``items`` (DeepFashion2-layout item retrieval) or ``cir`` (composed image retrieval)
_KINDS: dict[str, str] = {}


def register_dataset(name: str, *, kind: str) -> Any:
    """Decorator registering a dataset factory ``factory(*, root, split, **options)`` of a kind (``items`` or
    ``cir``), so that CLIs offer the right datasets for each mode."""
    if kind not in ("items", "cir"):
        raise ConfigError(f"dataset kind must be 'items' or 'cir', got {kind!r}")
    _KINDS[name] = kind
    return _DATASETS.register(name)


def create_dataset(name: str, *, root: str | Path, split: str, **options: Any) -> Any:
    """Build dataset ``name`` (see :func:`list_datasets`) from ``root``; ``options`` go to its reader."""
    return _DATASETS.create(name, root=root, split=split, **options)


def list_datasets(kind: str | None = None) -> list[str]:
    """Registered dataset names, all or those of one kind (``items`` | ``cir``)."""
    return [n for n in _DATASETS.names() if kind is None or _KINDS.get(n) == kind]


@register_dataset("deepfashion2", kind="items")
def _deepfashion2(*, root: str | Path, split: str, with_geometry: bool = False, progress: bool = True) -> Any:
    """The items (``list[Item]``) of one split."""
    from capret.data.deepfashion2 import load_items

    return load_items(root, split, with_geometry=with_geometry, progress=progress)


@register_dataset("demo", kind="items")
def _demo(*, root: str | Path, split: str, with_geometry: bool = False, progress: bool = True) -> Any:
    """The quickstart dataset: DeepFashion2 layout, so the DeepFashion2 reader serves it."""
    from capret.data.deepfashion2 import load_items

    return load_items(root, split, with_geometry=with_geometry, progress=progress)


@register_dataset("fashioniq", kind="cir")
def _fashioniq(
    *, root: str | Path, split: str, category: str, caption_mode: Literal["train", "eval"] | None = None
) -> Any:
    """One category; ``caption_mode`` ``eval`` joins the two captions in the fixed order of the evaluation."""
    from capret.data.fashioniq import FashionIQ

    return FashionIQ(root, category, split, caption_mode=caption_mode)


@register_dataset("cirr", kind="cir")
def _cirr(*, root: str | Path, split: str) -> Any:
    from capret.data.cirr import CIRR

    return CIRR(root, split)


@register_dataset("circo", kind="cir")
def _circo(*, root: str | Path, split: str, gallery_ids: Any = None) -> Any:
    from capret.data.circo import CIRCO

    return CIRCO(root, split, gallery_ids=gallery_ids)
