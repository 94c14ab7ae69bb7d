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


def test_baseline_descriptor_properties() -> None:
    from capret.quickstart.baseline import baseline_descriptor

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    red = Image.new("RGB", (40, 40), (200, 20, 20))
    red_big = Image.new("RGB", (90, 60), (200, 20, 20))
    blue = Image.new("RGB", (40, 40), (20, 20, 200))
    feats = baseline_descriptor([noise, red, red_big, blue])
    assert feats.shape == (4, 160) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    assert feats[1] @ feats[2] > 0.99 > feats[1] @ feats[3]  # colour decides, size does not
    np.testing.assert_array_equal(baseline_descriptor([noise]), feats[:1])


def test_quickstart_baseline_stage(tmp_path: Path) -> None:
    from capret.data.demo import build_demo_dataset
    from capret.quickstart import QuickstartContext
    from capret.quickstart.baseline import run

    build_demo_dataset(tmp_path / "data", 0, num_identities=30, progress=False)
    ctx = QuickstartContext(out_dir=tmp_path, data_root=tmp_path / "data")
    report = run(ctx)
    assert set(report) == {
        "map",
        "recall@1",
        "recall@5",
        "recall@10",
        "official_top1",
        "official_top10",
        "grid_png",
    }
    assert report["official_top1"] == report["recall@1"] and report["official_top10"] == report["recall@10"]
    assert 0 < report["map"] <= 1 and report["recall@1"] <= report["recall@5"] <= report["recall@10"]
    assert Path(report["grid_png"]).is_file()
    assert (tmp_path / "baseline_retrieval_results.json").is_file()
    state = ctx.state["baseline"]
    assert state["query_features"].shape[0] == len(state["query_labels"]) == len(state["query_images"])
