"""The garment world: a rendered DeepFashion2 / FashionIQ / image-text corpus whose signal lives in the pixels.

Garments of the 13 DeepFashion2 categories are drawn as garments (silhouettes a person names at a glance) with
known attributes (:mod:`.vocab`), photographed alone in shop images and worn in cluttered consumer photos
(:mod:`.scenes`), and written in the layouts capret's readers expect (:mod:`.world`, :mod:`.cir`,
:mod:`.pretrain`). Modules: :mod:`.vocab` (vocabularies, ``describe``), :mod:`.shapes` (silhouettes),
:mod:`.patterns` (fabric and material), :mod:`.paint` (pixels and label maps), :mod:`.scenes` (photos and
annotations), :mod:`.sampling` (identities and families), :mod:`.records`, :mod:`.world` (``build_world``).
See docs/garments.md.
"""

from __future__ import annotations

from capret.data.garments.world import (
    WORLD_VERSION,
    WorldSummary,
    build_world,
    deepfashion2_truth,
    load_truth,
    read_world,
)

__all__ = ["WORLD_VERSION", "WorldSummary", "build_world", "deepfashion2_truth", "load_truth", "read_world"]
