"""The embedded demo dataset: layout, ground truth, disjoint identities, determinism, SIFT matchability."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capret.data.deepfashion2 import (
    KEYPOINT_COUNTS,
    build_retrieval_ground_truth,
    load_items,
    open_image,
)
from capret.data.demo import MARKER_FILE, build_demo_dataset, read_demo_marker
from capret.quickstart import QuickstartContext
from capret.quickstart import data as data_stage


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo")
    summary = build_demo_dataset(root, seed=0, progress=False)
    return root, summary


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_summary_counts(demo: tuple[Path, dict]) -> None:
    root, summary = demo
    assert summary["identities_train"] + summary["identities_validation"] >= 100
    assert summary["identities_validation"] >= 40
    assert summary["train_images"] == 5 * summary["identities_train"]
    assert summary["validation_images"] == 5 * summary["identities_validation"]
    assert summary["query_items"] == 4 * summary["identities_validation"]
    assert summary["gallery_items"] == summary["identities_validation"]
    assert len(summary["photos"]) >= 8
    assert read_demo_marker(root) == summary


def test_layout_loads_with_official_fields(demo: tuple[Path, dict]) -> None:
    root, summary = demo
    for split in ("train", "validation"):
        items = load_items(root, split, with_geometry=True, progress=False)
        assert len(items) == summary[f"{split}_images"]
        assert sorted(p.name for p in (root / split / "image").iterdir()) == [
            f"{it.image_id:06d}.jpg" for it in items
        ]
        for item in items[:60]:
            assert item.item_index == 1 and item.style == 1
            image = open_image(root, split, item.image_id)
            width, height = image.size
            assert max(width, height) <= 256
            x1, y1, x2, y2 = item.bbox
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            assert len(item.landmarks) == 3 * KEYPOINT_COUNTS[item.category_id]
            marks = np.asarray(item.landmarks).reshape(-1, 3)
            assert set(marks[:, 2].tolist()) <= {0, 1, 2}
            assert item.zoom_in > 1 or (marks[:, 2] > 0).sum() >= 3
            polygon = np.asarray(item.segmentation[0]).reshape(-1, 2)
            assert len(polygon) >= 3
            assert polygon[:, 0].min() >= -0.01 and polygon[:, 0].max() <= width + 0.01
            assert polygon[:, 1].min() >= -0.01 and polygon[:, 1].max() <= height + 0.01
            for name in ("scale", "occlusion", "zoom_in", "viewpoint"):
                assert getattr(item, name) in (1, 2, 3)
            if item.source == "shop":
                assert (item.viewpoint, item.occlusion, item.zoom_in) == (1, 1, 1)
        # the annotation files hold every official field
        anno = json.loads((root / split / "annos" / "000001.json").read_text())
        assert set(anno) == {"source", "pair_id", "item1"}
        assert set(anno["item1"]) == {
            "segmentation", "scale", "viewpoint", "zoom_in", "landmarks", "style", "bounding_box",
            "category_id", "occlusion", "category_name",
        }  # fmt: skip


def test_identities_disjoint_with_views(demo: tuple[Path, dict]) -> None:
    root, _ = demo
    views: dict[str, dict[int, dict[str, int]]] = {}
    categories = set()
    for split in ("train", "validation"):
        views[split] = defaultdict(lambda: {"user": 0, "shop": 0})
        for item in load_items(root, split, progress=False):
            views[split][item.pair_id][item.source] += 1
            categories.add(item.category_id)
    assert not set(views["train"]) & set(views["validation"])
    assert categories == set(range(1, 14))
    for split_views in views.values():
        for counts in split_views.values():
            assert counts["shop"] == 1 and counts["user"] >= 3
    # identities are non-overlapping regions of the photographs (no near-duplicates anywhere)
    manifest = json.loads((root / "demo_manifest.json").read_text())
    assert len({(r["photo"], tuple(r["box"])) for r in manifest}) == len(manifest)
    by_photo = defaultdict(list)
    for rec in manifest:
        by_photo[rec["photo"]].append(rec["box"])
    for boxes in by_photo.values():
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_ground_truth_files_match_builder(demo: tuple[Path, dict]) -> None:
    root, _ = demo
    query_gt, gallery_gt = build_retrieval_ground_truth(load_items(root, "validation", progress=False))
    assert json.loads((root / "validation" / "query_gt.json").read_text()) == query_gt
    assert json.loads((root / "validation" / "gallery_gt.json").read_text()) == gallery_gt
    gallery_ids = {(r["pair_id"], r["style"]) for r in gallery_gt}
    assert all((r["pair_id"], r["style"]) in gallery_ids for r in query_gt)


def test_build_is_deterministic_and_seeded(tmp_path: Path) -> None:
    first = build_demo_dataset(tmp_path / "a", seed=3, num_identities=6, progress=False)
    second = build_demo_dataset(tmp_path / "b", seed=3, num_identities=6, progress=False)
    assert first == second
    assert _tree_hashes(tmp_path / "a") == _tree_hashes(tmp_path / "b")
    other = build_demo_dataset(tmp_path / "c", seed=4, num_identities=6, progress=False)
    assert other["seed"] == 4
    assert _tree_hashes(tmp_path / "a") != _tree_hashes(tmp_path / "c")
    # rebuilding over our own build is allowed and gives the same bytes
    build_demo_dataset(tmp_path / "a", seed=3, num_identities=6, progress=False)
    assert _tree_hashes(tmp_path / "a") == _tree_hashes(tmp_path / "b")


def test_refuses_foreign_folders_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(FileExistsError, match="train"):
        build_demo_dataset(tmp_path, seed=0, num_identities=4, progress=False)
    with pytest.raises(ValueError, match="num_identities must be <= "):
        build_demo_dataset(tmp_path / "x", seed=0, num_identities=100_000, progress=False)
    with pytest.raises(ValueError, match="validation_fraction"):
        build_demo_dataset(tmp_path / "y", seed=0, num_identities=4, validation_fraction=1.0)


def test_quickstart_stage_reuses_a_matching_build(
    demo: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, summary = demo
    ctx = QuickstartContext(out_dir=root.parent, data_root=root, seed=0)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt although a build with the same seed exists")

    monkeypatch.setattr(data_stage, "build_demo_dataset", no_rebuild)
    result = data_stage.run(ctx)
    assert result == {
        "world": "demo",
        "root": str(root),
        **{key: summary[key] for key in data_stage.DEMO_REPORT_KEYS},
    }
    assert ctx.state["splits"] == {"train": root / "train", "validation": root / "validation"}
    assert ctx.state["query_gt"].is_file() and ctx.state["gallery_gt"].is_file()

    calls = []
    monkeypatch.setattr(data_stage, "build_demo_dataset", lambda r, s: calls.append((r, s)) or summary)
    data_stage.run(QuickstartContext(out_dir=root.parent, data_root=root, seed=1))
    assert calls == [(root, 1)]
    assert (root / MARKER_FILE).is_file()


def _sift(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    from skimage.feature import SIFT

    sift = SIFT()
    sift.detect_and_extract(np.asarray(image.convert("L"), dtype=np.float64) / 255.0)
    return sift.keypoints[:, ::-1], sift.descriptors


def _inliers(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> int:
    """Reference geometric verification: ratio-test SIFT matches, then RANSAC homography inliers."""
    from skimage.feature import match_descriptors
    from skimage.measure import ransac
    from skimage.transform import ProjectiveTransform

    matches = match_descriptors(a[1], b[1], max_ratio=0.8, cross_check=True)
    if len(matches) < 4:
        return 0
    src, dst = a[0][matches[:, 0]], b[0][matches[:, 1]]
    _, inliers = ransac(
        (src, dst), ProjectiveTransform, min_samples=4, residual_threshold=4, max_trials=500, rng=0
    )
    return 0 if inliers is None else int(inliers.sum())


def test_user_views_match_their_shop_view_with_sift(demo: tuple[Path, dict]) -> None:
    root, _ = demo
    items = load_items(root, "validation", progress=False)
    shops = {it.pair_id: it for it in items if it.source == "shop"}
    pairs = sorted(shops)[:3]
    shop_feats = [_sift(open_image(root, "validation", shops[p].image_id)) for p in pairs]
    strong = 0
    for k, pair_id in enumerate(pairs):
        user = next(it for it in items if it.source == "user" and it.pair_id == pair_id)
        query = _sift(open_image(root, "validation", user.image_id))
        right = _inliers(query, shop_feats[k])
        wrong = _inliers(query, shop_feats[(k + 1) % len(pairs)])
        assert right > wrong, (pair_id, right, wrong)
        strong += right >= 12
    assert strong >= 2
