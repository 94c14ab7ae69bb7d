"""Shared records of the garment world's writers: identities, family splits and generator stream numbers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from capret.data.garments.patterns import sample_look
from capret.data.garments.sampling import categories_cycle, family

__all__ = [
    "STREAM_DF2",
    "STREAM_FIQ",
    "STREAM_PRETRAIN",
    "Identity",
    "PartOptions",
    "draw_identities",
    "split_families",
]

#: generator stream numbers (the first key after the seed), one per part of the world
STREAM_DF2, STREAM_FIQ, STREAM_PRETRAIN = 1, 2, 3


@dataclass
class Identity:
    """One garment of the world: its id, attributes, family, where it lives and which images show it."""

    id: str
    attributes: dict[str, Any]
    family: str
    dataset: str
    split: str
    role: str = (
        "identity"  # "identity" (pairable, style 1) or "companion" (an outfit's other garment, style 0)
    )
    pair_id: int | None = None
    images: list[str] = field(default_factory=list)  # "path" or "path#itemN", relative to the world root

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("id")
        return out


def split_families(
    drawn: Sequence[tuple[str, Mapping[str, Any], Any]], *, fraction: float, rng: np.random.Generator
) -> dict[str, str]:
    """Family name -> ``train`` | ``validation``, stratified by category.

    Within each category ``fraction`` of its families (stochastically rounded) go to validation, keeping at
    least one family in train, so every category the validation split holds was seen in training; at least
    one family overall goes to validation.
    """
    by_category: dict[str, list[str]] = {}
    for name, attributes, _ in drawn:
        members = by_category.setdefault(str(attributes["category"]), [])
        if name not in members:
            members.append(name)
    out: dict[str, str] = {}
    for category in sorted(by_category):
        names = by_category[category]
        order = [names[i] for i in rng.permutation(len(names))]
        count = min(len(names) - 1, int(np.floor(len(names) * fraction + rng.random())))
        for i, name in enumerate(order):
            out[name] = "validation" if i < count else "train"
    if "validation" not in out.values():
        names = sorted(out)
        out[names[int(rng.integers(len(names)))]] = "validation"
    return out


def draw_identities(
    count: int, *, prefix: str, rng: np.random.Generator, max_family: int = 3
) -> list[tuple[str, dict[str, Any], Any]]:
    """``count`` identities ``(family, attributes, look)`` in families of 1..max_family, categories balanced."""
    out: list[tuple[str, dict[str, Any], Any]] = []
    categories = categories_cycle(count, rng)
    index = 0
    while len(out) < count:
        members = min(int(rng.integers(1, max_family + 1)), count - len(out))
        name = f"{prefix}f{index:04d}"
        look = sample_look(rng)
        for attributes in family(categories[index % len(categories)], rng, members=members):
            out.append((name, attributes, look))
        index += 1
    return out


@dataclass(frozen=True)
class PartOptions:
    """What :func:`capret.data.garments.world.build_world` hands a part writer that draws its own identities in
    families (DeepFashion2, pretraining): the world's seed and image sizes, and the part's identity count and
    validation share. The part's randomness comes from its generator stream (``STREAM_*``): ``(seed, stream, 0)``
    draws the identities and splits their families, ``(seed, stream, 1, index)`` renders identity ``index``.
    """

    seed: int
    identities: int
    size: int
    shop_size: int
    family_size: int
    validation_fraction: float
    progress: bool

    def draw(
        self, stream: int, *, prefix: str
    ) -> tuple[list[tuple[str, dict[str, Any], Any]], dict[str, str]]:
        """The part's identities ``(family, attributes, look)`` and each family's split (see :func:`split_families`)."""
        rng = np.random.default_rng([self.seed, stream, 0])
        drawn = draw_identities(self.identities, prefix=prefix, rng=rng, max_family=self.family_size)
        return drawn, split_families(drawn, fraction=self.validation_fraction, rng=rng)

    def identity_rng(self, stream: int, index: int) -> np.random.Generator:
        """The generator that renders identity ``index`` of the part (its own, so identities do not interact)."""
        return np.random.default_rng([self.seed, stream, 1, index])
