"""DeepFashion2 loader, ground truth and COCO export on synthetic folders and the real validation GT files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from repo_paths import SHARED_DATA

from capret.data.deepfashion2 import (
    CATEGORIES,
    KEYPOINT_COUNTS,
    KEYPOINT_OFFSETS,
    Item,
    build_retrieval_ground_truth,
    crop_item,
    gt_box_protocol,
    image_path,
    items_from_ground_truth,
    load_ground_truth,
    load_item_geometry,
    load_items,
    open_image,
    to_coco,
)

REAL = SHARED_DATA / "deepfashion2"


def _item_json(category_id: int, style: int, bbox: list[int], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n = KEYPOINT_COUNTS[category_id]
    landmarks = []
    for _ in range(n):
        landmarks += [int(rng.integers(bbox[0], bbox[2] + 1)), int(rng.integers(bbox[1], bbox[3] + 1)), 2]
    x1, y1, x2, y2 = bbox
    return {
        "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
        "scale": 2,
        "viewpoint": 2,
        "zoom_in": 1,
        "landmarks": landmarks,
        "style": style,
        "bounding_box": bbox,
        "category_id": category_id,
        "occlusion": 1,
        "category_name": CATEGORIES[category_id],
    }


# image_id -> (source, pair_id, [(category_id, style, bbox)])
SYNTH = {
    1: ("user", 1, [(13, 2, [10, 12, 50, 60]), (5, 1, [5, 6, 40, 30])]),
    2: ("user", 1, [(5, 0, [3, 4, 30, 40])]),
    3: ("shop", 1, [(13, 2, [8, 8, 56, 60]), (5, 1, [2, 2, 20, 20])]),
    4: ("shop", 1, [(5, 0, [1, 1, 30, 30])]),
    7: ("user", 2, [(1, 1, [0, 0, 63, 47])]),
    8: ("shop", 2, [(1, 1, [2, 3, 60, 40]), (8, 1, [1, 1, 9, 9])]),
}


def write_synthetic(root: Path, split: str = "validation") -> Path:
    (root / split / "annos").mkdir(parents=True)
    (root / split / "image").mkdir(parents=True)
    for image_id, (source, pair_id, entries) in SYNTH.items():
        anno: dict = {"source": source, "pair_id": pair_id}
        for k, (cat, style, bbox) in enumerate(entries, start=1):
            anno[f"item{k}"] = _item_json(cat, style, bbox, seed=image_id * 10 + k)
        (root / split / "annos" / f"{image_id:06d}.json").write_text(json.dumps(anno))
        Image.new("RGB", (64, 48), (image_id * 20, 100, 50)).save(
            image_path(root, split, image_id), quality=90
        )
    return root


@pytest.fixture()
def synth(tmp_path: Path) -> Path:
    return write_synthetic(tmp_path / "df2")


def test_load_items_fields_and_order(synth: Path) -> None:
    items = load_items(synth, "validation", progress=False)
    assert [(it.image_id, it.item_index) for it in items] == [
        (1, 1), (1, 2), (2, 1), (3, 1), (3, 2), (4, 1), (7, 1), (8, 1), (8, 2)
    ]  # fmt: skip
    first = items[0]
    assert first.source == "user" and first.pair_id == 1 and first.style == 2
    assert first.category_id == 13 and first.category_name == "sling dress"
    assert first.bbox == (10, 12, 50, 60)
    assert (first.scale, first.occlusion, first.zoom_in, first.viewpoint) == (2, 1, 1, 2)
    assert first.landmarks == () and first.segmentation == ()
    assert first.key == "deepfashion2/000001/1"
    full = load_items(synth, "validation", with_geometry=True, progress=False)
    assert len(full[0].landmarks) == 3 * KEYPOINT_COUNTS[13]
    assert full[0].segmentation == ((10, 12, 50, 12, 50, 60, 10, 60),)
    assert load_item_geometry(synth, "validation", items[0]) == full[0]
    assert [(it.image_id, it.bbox) for it in full] == [(it.image_id, it.bbox) for it in items]


def test_cache_is_reused_and_invalidated(synth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from capret.data import deepfashion2 as df2

    first = load_items(synth, "validation", progress=False)
    cache_file = df2.index_cache_path(synth / "validation" / "annos")
    assert cache_file.is_file() and str(cache_file).startswith(os.environ["CAPRET_CACHE"])
    assert not list(synth.rglob("*.npz"))  # never inside the dataset root

    def boom(*args, **kwargs):
        raise AssertionError("annotation parsed although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(df2, "_parse_annotation", boom)
        assert load_items(synth, "validation", progress=False) == first

    # a changed annotation (newer mtime) invalidates the cache
    path = synth / "validation" / "annos" / "000007.json"
    anno = json.loads(path.read_text())
    anno["item1"]["style"] = 3
    path.write_text(json.dumps(anno))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000_000))
    changed = load_items(synth, "validation", progress=False)
    assert [it.style for it in changed if it.image_id == 7] == [3]

    # a same-size edit with the old mtime restored (cp -p, rsync -a) still invalidates it (ctime changes)
    path = synth / "validation" / "annos" / "000008.json"
    stat = path.stat()
    anno = json.loads(path.read_text())
    anno["item1"]["bounding_box"] = [1, 2, 30, 40]
    path.write_text(json.dumps(anno))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert [it.bbox for it in load_items(synth, "validation", progress=False) if it.image_id == 8][0] == (
        1,
        2,
        30,
        40,
    )

    # a new file (count changes) invalidates it too
    extra = synth / "validation" / "annos" / "000009.json"
    extra.write_text(json.dumps({"source": "user", "pair_id": 5, "item1": _item_json(2, 1, [0, 0, 5, 5], 1)}))
    os.utime(extra, ns=(1, 1))  # older than everything: only the count reveals it
    assert load_items(synth, "validation", progress=False)[-1].image_id == 9


@pytest.mark.parametrize(
    ("mutate", "field_name"),
    [
        (lambda a: a.pop("source"), "source"),
        (lambda a: a.__setitem__("pair_id", "7"), "pair_id"),
        (lambda a: a["item1"].pop("bounding_box"), "item1.bounding_box"),
        (lambda a: a["item1"].__setitem__("category_id", 14), "item1.category_id"),
        (lambda a: a["item1"].__setitem__("style", 1.5), "style"),
        (lambda a: a["item1"].__setitem__("landmarks", [1, 2]), "item1.landmarks"),
    ],
)
def test_malformed_annotation_names_file_and_field(synth: Path, mutate, field_name: str) -> None:
    path = synth / "validation" / "annos" / "000003.json"
    anno = json.loads(path.read_text())
    mutate(anno)
    path.write_text(json.dumps(anno))
    with pytest.raises(ValueError) as info:
        load_items(synth, "validation", with_geometry=True, progress=False)
    assert "000003.json" in str(info.value) and field_name in str(info.value)


def test_bad_json_and_missing_folders(synth: Path, tmp_path: Path) -> None:
    (synth / "validation" / "annos" / "000004.json").write_text("{not json")
    with pytest.raises(ValueError, match="000004.json"):
        load_items(synth, "validation", progress=False)
    with pytest.raises(FileNotFoundError, match="train"):
        load_items(synth, "train", progress=False)
    with pytest.raises(FileNotFoundError, match="000099.jpg"):
        open_image(synth, "validation", 99)


def test_open_and_crop(synth: Path) -> None:
    image = open_image(synth, "validation", 7)
    assert image.mode == "RGB" and image.size == (64, 48)
    assert crop_item(image, (10, 10, 30, 20)).size == (20, 10)
    assert crop_item(image, (10, 10, 30, 20), margin=0.5).size == (40, 20)
    assert crop_item(image, (-5, -5, 100, 100), margin=0.2).size == (64, 48)
    assert crop_item(image, (64, 48, 64, 48)).size == (1, 1)


def test_ground_truth_rules_on_synthetic(synth: Path) -> None:
    items = load_items(synth, "validation", progress=False)
    query_gt, gallery_gt = build_retrieval_ground_truth(items)
    # every user item, style 0 included; only style > 0 shop items
    assert [(r["query_image_id"], r["style"]) for r in query_gt] == [(1, 2), (1, 1), (2, 0), (7, 1)]
    assert [(r["gallery_image_id"], r["style"]) for r in gallery_gt] == [(3, 2), (3, 1), (8, 1), (8, 1)]
    assert list(query_gt[0]) == ["style", "pair_id", "query_image_id", "bbox", "cls"]
    assert list(gallery_gt[0]) == ["gallery_image_id", "style", "pair_id", "bbox"]
    assert query_gt[0] == {"style": 2, "pair_id": 1, "query_image_id": 1, "bbox": [10, 12, 50, 60], "cls": 13}
    assert load_ground_truth(query_gt) == query_gt

    queries, gallery = gt_box_protocol(items)
    assert [it.identity for it in queries.items] == [(1, 2), (1, 1), (2, 1)]
    assert queries.identities is gallery.identities
    for side in (queries, gallery):
        for item, label in zip(side.items, side.labels.tolist()):
            assert side.identities[label] == item.identity
    # same label <=> same identity, across sides
    for qi, ql in zip(queries.items, queries.labels.tolist()):
        for gi, gl in zip(gallery.items, gallery.labels.tolist()):
            assert (ql == gl) == (qi.identity == gi.identity)


def test_ground_truth_validation_errors(tmp_path: Path) -> None:
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps([{"style": 1, "pair_id": 1, "query_image_id": 2, "bbox": [1, 2, 3], "cls": 1}]))
    with pytest.raises(ValueError, match=r"q\.json: record 0 .*'bbox'"):
        load_ground_truth(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_ground_truth(tmp_path / "nope.json")


def test_coco_export_loads_in_pycocotools(synth: Path, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    items = load_items(synth, "validation", progress=False)
    coco = to_coco(items, root=synth, split="validation")
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    api = COCO(str(path))
    assert len(api.getImgIds()) == len(SYNTH) and len(api.getAnnIds()) == len(items)
    assert len(api.loadCats(api.getCatIds())) == 13
    assert all(len(c["keypoints"]) == 294 for c in coco["categories"])
    img = api.loadImgs([8])[0]
    assert (img["file_name"], img["width"], img["height"]) == ("000008.jpg", 64, 48)
    full = {(it.image_id, it.item_index): it for it in load_items(synth, "validation", with_geometry=True)}
    for ann, item in zip(coco["annotations"], items):
        x1, y1, x2, y2 = item.bbox
        assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1] and ann["area"] == (x2 - x1) * (y2 - y1)
        kp = np.asarray(ann["keypoints"]).reshape(294, 3)
        start, count = KEYPOINT_OFFSETS[item.category_id], KEYPOINT_COUNTS[item.category_id]
        expected = np.asarray(full[(item.image_id, item.item_index)].landmarks).reshape(count, 3)
        np.testing.assert_array_equal(kp[start : start + count], expected)
        assert not kp[:start].any() and not kp[start + count :].any()
        assert ann["num_keypoints"] == count
    mask = api.annToMask(coco["annotations"][0])
    assert mask.shape == (48, 64) and mask.sum() > 0


@pytest.mark.usefixtures("shared_data")
def test_real_ground_truth_counts_and_round_trip() -> None:
    query_gt = load_ground_truth(REAL / "query_gt.json")
    gallery_gt = load_ground_truth(REAL / "gallery_gt.json")
    assert len(query_gt) == 15_752
    assert sum(r["style"] > 0 for r in query_gt) == 12_550
    assert len({r["query_image_id"] for r in query_gt}) == 10_990
    assert len(gallery_gt) == 24_012
    assert len({r["gallery_image_id"] for r in gallery_gt}) == 21_390

    # items -> GT reproduces the official files exactly (records, key order, integer boxes)
    items = items_from_ground_truth(query_gt) + items_from_ground_truth(gallery_gt)
    rebuilt_query, rebuilt_gallery = build_retrieval_ground_truth(items)
    assert json.dumps(rebuilt_query) == (REAL / "query_gt.json").read_text().strip()
    assert json.dumps(rebuilt_gallery) == (REAL / "gallery_gt.json").read_text().strip()

    queries, gallery = gt_box_protocol(items)
    assert len(queries.items) == 12_550 and len(gallery.items) == 24_012
    query_ids = {queries.identities[label] for label in queries.labels.tolist()}
    assert len(query_ids) == 3_043


def test_item_identity_and_key() -> None:
    item = Item(1, 2, "shop", 5, 1, 8, "trousers", (0, 0, 1, 1))
    assert item.identity == (5, 1) and item.key == "deepfashion2/000001/2" and not item.has_geometry
