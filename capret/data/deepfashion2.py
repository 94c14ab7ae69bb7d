"""DeepFashion2: typed items from the official per-image annotation layout.

(Work in progress: the loader, ground-truth builders and COCO export are being added.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Official category ids (1-based) and names.
CATEGORIES: dict[int, str] = {
    1: "short sleeve top",
    2: "long sleeve top",
    3: "short sleeve outwear",
    4: "long sleeve outwear",
    5: "vest",
    6: "sling",
    7: "shorts",
    8: "trousers",
    9: "skirt",
    10: "short sleeve dress",
    11: "long sleeve dress",
    12: "vest dress",
    13: "sling dress",
}


@dataclass(frozen=True)
class Item:
    """One clothing item of one DeepFashion2 image.

    ``(image_id, item_index)`` identifies the item; ``identity`` = ``(pair_id, style)`` is its retrieval
    label (only meaningful when ``style > 0``). ``bbox`` is ``[x1, y1, x2, y2]`` in pixels.
    Landmarks and segmentation may be left empty by the streaming index (they are re-read on demand).
    """

    image_id: int
    item_index: int
    source: str  # "user" (query side) or "shop" (gallery side)
    pair_id: int
    style: int
    category_id: int
    category_name: str
    bbox: tuple[float, float, float, float]
    scale: int = 0
    occlusion: int = 0
    zoom_in: int = 0
    viewpoint: int = 0
    landmarks: tuple[float, ...] = field(default=(), repr=False)
    segmentation: tuple[tuple[float, ...], ...] = field(default=(), repr=False)

    @property
    def key(self) -> str:
        """Caption-store key ``deepfashion2/<image_id>/<item_index>`` (DESIGN.md)."""
        return f"deepfashion2/{self.image_id:06d}/{self.item_index}"

    @property
    def identity(self) -> tuple[int, int]:
        return (self.pair_id, self.style)
