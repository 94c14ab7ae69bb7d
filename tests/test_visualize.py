"""Retrieval grid and recall curve pictures are written and show what they should."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capret.evaluation.visualize import load_tile, plot_recall_curve, plot_retrieval_grid


def _images(tmp_path: Path, n: int, prefix: str) -> list[tuple[str, tuple[float, ...] | None]]:
    refs = []
    for i in range(n):
        path = tmp_path / f"{prefix}{i}.png"
        arr = np.zeros((60, 80, 3), np.uint8)
        arr[10:50, 20:60] = ((40 * i) % 255, 200 - (15 * i) % 200, 120)
        Image.fromarray(arr).save(path)
        refs.append((str(path), (20.0, 10.0, 60.0, 50.0) if i % 2 else None))
    return refs


def test_grid_outlines_and_missing_image(tmp_path: Path) -> None:
    queries = _images(tmp_path, 3, "q")
    gallery = _images(tmp_path, 6, "g")
    gallery[4] = (str(tmp_path / "does_not_exist.jpg"), None)  # drawn grey, never fails the picture
    ranking = np.array([[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5]])
    hits = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0]], dtype=bool)
    out = plot_retrieval_grid(
        tmp_path / "grid.png", query_images=queries, gallery_images=gallery, ranking=ranking, hits=hits, k=4
    )
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert image.shape[0] > 200 and image.shape[1] > 400
    green = ((image[..., 1] > 130) & (image[..., 0] < 60) & (image[..., 2] < 110)).sum()
    red = ((image[..., 0] > 190) & (image[..., 1] < 80) & (image[..., 2] < 80)).sum()
    assert green > 500 and red > 500  # both outline colours are drawn
    with pytest.raises(ValueError, match="must be equal"):
        plot_retrieval_grid(
            tmp_path / "x.png",
            query_images=queries,
            gallery_images=gallery,
            ranking=ranking,
            hits=hits[:, :2],
        )


def test_tile_crops_to_box(tmp_path: Path) -> None:
    (path, _), *_ = _images(tmp_path, 1, "t")
    whole = load_tile((path, None), size=64)
    crop = load_tile((path, (20, 10, 60, 50)), size=64)
    assert whole.shape == crop.shape == (64, 64, 3)
    # the crop is all item colour, the whole image has black margins
    assert (crop.sum(-1) == 0).mean() < 0.05 < (whole.sum(-1) == 0).mean()
    assert (load_tile((str(tmp_path / "nope.png"), None), size=16) == 200).all()


def test_recall_curve(tmp_path: Path) -> None:
    out = plot_recall_curve(
        tmp_path / "r.png", {"before": {1: 0.2, 5: 0.5, 10: 0.7}, "after": {1: 0.3, 5: 0.6, 10: 0.75}}
    )
    assert out.is_file() and Image.open(out).size[0] > 300
    with pytest.raises(ValueError):
        plot_recall_curve(tmp_path / "e.png", {})
