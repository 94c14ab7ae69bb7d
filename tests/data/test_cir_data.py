"""Composed-retrieval datasets built from the real FashionIQ / CIRR / CIRCO annotation files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image
from repo_paths import SHARED_DATA

from capret.data.circo import CIRCO, read_gallery_ids
from capret.data.cirr import CIRR
from capret.data.fashioniq import PAIRINGS, FashionIQ, pair_captions

DATA = SHARED_DATA
FIQ_SIZES = {"dress": 2017, "shirt": 2038, "toptee": 1961}


@pytest.mark.parametrize("category", sorted(FIQ_SIZES))
def test_fashioniq_val_sizes_and_gallery(category: str) -> None:
    ds = FashionIQ(DATA / "fashioniq", category, "val")
    assert len(ds) == FIQ_SIZES[category]
    raw = json.loads((DATA / "fashioniq" / "captions" / f"cap.{category}.val.json").read_text())
    first = ds[0]
    assert first.reference == raw[0]["candidate"]
    assert first.target == raw[0]["target"]
    assert first.captions == tuple(raw[0]["captions"])
    assert first.query_id == 0 and first.category == category
    gallery = json.loads((DATA / "fashioniq" / "image_splits" / f"split.{category}.val.json").read_text())
    assert ds.gallery == gallery
    # Every val target is in the category gallery (the R@K protocol relies on it).
    assert {t.target for t in ds.triplets} <= set(ds.gallery)


def test_fashioniq_eval_caption_pairing() -> None:
    ds = FashionIQ(DATA / "fashioniq", "dress", "val")
    assert ds[0].caption == "Is shiny and silver with shorter sleeves and fit and flare"
    assert {ds[0].caption for _ in range(10)} == {ds[0].caption}  # deterministic in eval mode
    assert pair_captions(["is red.", "Has long sleeves?"], "c1_and_c2") == "Is red and has long sleeves"
    assert pair_captions(["is red.", "Has long sleeves?"], "c2_and_c1") == "Has long sleeves and is red"
    assert pair_captions(["is red.", "Has long sleeves?"], "c1") == "Is red"
    assert pair_captions(["is red.", "has long sleeves"], "c2") == "Has long sleeves"
    with pytest.raises(ValueError, match="valid pairings"):
        pair_captions(["a", "b"], "both")  # type: ignore[arg-type]


def test_fashioniq_training_pairing_draws_all_four() -> None:
    ds = FashionIQ(DATA / "fashioniq", "dress", "val", caption_mode="train", seed=0)
    c1, c2 = ds.triplets[0].captions
    expected = {pair_captions((c1, c2), p) for p in PAIRINGS}  # type: ignore[arg-type]
    drawn = {ds[0].caption for _ in range(200)}
    assert drawn == expected


def test_fashioniq_unseeded_pairing_follows_random_module() -> None:
    """Without a seed the pairing draws from ``random`` (which DataLoader reseeds per worker)."""
    ds = FashionIQ(DATA / "fashioniq", "dress", "val", caption_mode="train")
    random.seed(11)
    first = [ds[i].caption for i in range(30)]
    random.seed(11)
    assert [ds[i].caption for i in range(30)] == first


def test_fashioniq_seeded_pairing_is_reproducible() -> None:
    a = FashionIQ(DATA / "fashioniq", "shirt", "val", caption_mode="train", seed=3)
    b = FashionIQ(DATA / "fashioniq", "shirt", "val", caption_mode="train", seed=3)
    assert [a[i].caption for i in range(50)] == [b[i].caption for i in range(50)]


def test_fashioniq_flat_layout_test_split_and_images(tmp_path: Path) -> None:
    raw = json.loads((DATA / "fashioniq" / "captions" / "cap.toptee.val.json").read_text())
    test = [{"candidate": r["candidate"], "captions": r["captions"]} for r in raw[:5]]
    (tmp_path / "cap.toptee.test.json").write_text(json.dumps(test))
    (tmp_path / "split.toptee.test.json").write_text(json.dumps([r["candidate"] for r in raw[:5]]))
    ds = FashionIQ(tmp_path, "toptee", "test")
    assert len(ds) == 5 and all(t.target is None for t in ds.triplets)
    name = ds[0].reference
    with pytest.raises(FileNotFoundError, match=f"{name}.png"):
        ds.load_image(name)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / "images" / f"{name}.jpg")
    assert ds.image_path(name) == tmp_path / "images" / f"{name}.jpg"
    assert ds.load_image(name).size == (8, 6)
    keys = ds.images_to_caption()
    assert keys[0] == (f"fashioniq/{name}/0", tmp_path / "images" / f"{name}.jpg")
    assert len({k for k, _ in keys}) == len(keys) == len({t.reference for t in ds.triplets})


def test_fashioniq_errors_name_file_and_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid: dress, shirt, toptee"):
        FashionIQ(DATA / "fashioniq", "shoes", "val")
    with pytest.raises(FileNotFoundError, match="cap.dress.train.json"):
        FashionIQ(DATA / "fashioniq", "dress", "train")
    (tmp_path / "cap.dress.val.json").write_text(json.dumps([{"candidate": "a", "captions": ["x", "y"]}]))
    (tmp_path / "split.dress.val.json").write_text(json.dumps(["a"]))
    with pytest.raises(ValueError, match=r"cap.dress.val.json: entry 0: missing field 'target'"):
        FashionIQ(tmp_path, "dress", "val")


def test_cirr_val() -> None:
    ds = CIRR(DATA / "cirr", "val")
    assert len(ds) == 4181
    assert len(ds.gallery) == 2297
    first = ds[0]
    assert first.pairid == 12060 and first.reference == "dev-244-0-img0"
    assert first.target == "dev-1028-1-img1" and first.caption == "show three bottles of soft drink"
    assert len(first.members) == 6 and first.reference in first.members
    assert ds.image_path("dev-244-0-img0") == DATA / "cirr" / "dev" / "dev-244-0-img0.png"
    assert all(t.target in t.members for t in ds.triplets)
    keys = ds.images_to_caption()
    assert len(keys) == len({t.reference for t in ds.triplets})
    assert keys[0][0] == "cirr/dev-244-0-img0/0"
    with pytest.raises(FileNotFoundError, match="dev-244-0-img0.png"):
        ds.load_image("dev-244-0-img0")
    with pytest.raises(KeyError, match="split.rc2.val.json"):
        ds.image_path("nope")


def test_cirr_nested_layout_and_test_split(tmp_path: Path) -> None:
    raw = json.loads((DATA / "cirr" / "captions" / "cap.rc2.val.json").read_text())
    test = [{k: v for k, v in r.items() if k not in ("target_hard", "target_soft")} for r in raw[:4]]
    (tmp_path / "cirr" / "captions").mkdir(parents=True)
    (tmp_path / "cirr" / "image_splits").mkdir(parents=True)
    (tmp_path / "cirr" / "captions" / "cap.rc2.test1.json").write_text(json.dumps(test))
    names = sorted({m for r in test for m in r["img_set"]["members"]})
    split = {n: f"./test1/{n}.png" for n in names}
    (tmp_path / "cirr" / "image_splits" / "split.rc2.test1.json").write_text(json.dumps(split))
    ds = CIRR(tmp_path, "test")
    assert ds.split == "test1" and len(ds) == 4 and all(t.target is None for t in ds.triplets)
    (tmp_path / "test1").mkdir()
    Image.new("RGB", (5, 5)).save(tmp_path / "test1" / f"{names[0]}.png")
    assert ds.load_image(names[0]).size == (5, 5)
    with pytest.raises(ValueError, match="valid: train, val, test1"):
        CIRR(tmp_path, "dev2")


def test_circo_val_and_gallery(tmp_path: Path) -> None:
    ds = CIRCO(DATA / "circo", "val", gallery_ids=[1, 2, 3])
    assert len(ds) == 220
    q = ds[0]
    assert q.query_id == 0 and q.reference == 271520 and q.target == 355099
    assert q.gt_ids == (355099, 528417, 534704) and q.gt_ids[0] == q.target
    assert ds.gallery == [1, 2, 3]
    assert ds.image_path(271520).name == "000000271520.jpg"
    assert (
        ds.image_path(271520) == DATA / "circo" / "COCO2017_unlabeled" / "unlabeled2017" / "000000271520.jpg"
    )
    with pytest.raises(FileNotFoundError, match="000000271520.jpg"):
        ds.load_image("271520")
    assert ds.images_to_caption()[0] == ("circo/271520/0", ds.image_path(271520))
    no_gallery = CIRCO(DATA / "circo", "val")
    with pytest.raises(FileNotFoundError, match="gallery_ids"):
        _ = no_gallery.gallery
    info = tmp_path / "image_info.json"
    info.write_text(json.dumps({"images": [{"id": 7, "file_name": "x"}, {"id": 9}]}))
    assert read_gallery_ids(info) == [7, 9]
    text = tmp_path / "ids.txt"
    text.write_text("5\n000000000006.jpg\n\n")
    assert CIRCO(DATA / "circo", "val", gallery_ids=text).gallery == [5, 6]
    bad = tmp_path / "bad.txt"
    bad.write_text("5\nabc\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        read_gallery_ids(bad)


def test_circo_test_split_and_default_gallery(tmp_path: Path) -> None:
    raw = json.loads((DATA / "circo" / "annotations" / "val.json").read_text())
    test = [{k: v for k, v in r.items() if k not in ("target_img_id", "gt_img_ids")} for r in raw[:3]]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "test.json").write_text(json.dumps(test))
    info = tmp_path / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"images": [{"id": 11}, {"id": 12}]}))
    ds = CIRCO(tmp_path, "test")
    assert len(ds) == 3 and all(q.target is None and q.gt_ids == () for q in ds.queries)
    assert ds.gallery == [11, 12]
    bad = [dict(raw[0], gt_img_ids=[1, 2])]
    (tmp_path / "annotations" / "val.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"val.json: entry 0 \(id 0\).*gt_img_ids"):
        CIRCO(tmp_path, "val")
