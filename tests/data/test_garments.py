"""The garment world: determinism, DeepFashion2/COCO/pycocotools/FashionIQ readers accept it, pretraining
jsonl, disjoint splits, the vocabulary's captions, and a small classifier that finds the category in the pixels."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capret.cli.main import main as capret_main
from capret.data.check import check_dataset
from capret.data.deepfashion2 import (
    KEYPOINT_COUNTS,
    build_retrieval_ground_truth,
    load_items,
    open_image,
    to_coco,
)
from capret.data.fashioniq import FashionIQ
from capret.data.garments import build_world, deepfashion2_truth, load_truth, read_world
from capret.data.garments.cir import difference, fiq_category, relative_captions
from capret.data.garments.vocab import CATEGORIES, COLOURS, describe
from capret.errors import DataError, OutputFolderError
from capret.evaluation.cir import fashioniq_recall

#: one identity per family, so 5 distinct garments per category (the classifier needs distinct shapes to learn)
SMALL = {"identities": 65, "cir_identities": 24, "pretrain_identities": 8, "size": 96, "user_views": 1,
         "family_size": 1}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("garments")
    start = time.perf_counter()
    summary = build_world(root, seed=3, **SMALL)
    assert summary.counts["images"] / (time.perf_counter() - start) > 2.0  # a loose floor on a loaded CPU
    return root, summary.to_dict()


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    tiny = {"identities": 4, "cir_identities": 6, "pretrain_identities": 2, "size": 96}
    build_world(tmp_path / "a", seed=5, **tiny)
    build_world(tmp_path / "b", seed=5, **tiny)
    build_world(tmp_path / "c", seed=6, **tiny)
    a, b, c = _hashes(tmp_path / "a"), _hashes(tmp_path / "b"), _hashes(tmp_path / "c")
    assert a == b and len(a) > 30
    assert a != c
    assert read_world(tmp_path / "a") == json.loads((tmp_path / "a" / "world.json").read_text())
    build_world(tmp_path / "a", seed=6, **tiny)  # an earlier world is replaced, file for file
    assert _hashes(tmp_path / "a") == c
    (tmp_path / "d" / "deepfashion2").mkdir(parents=True)
    with pytest.raises(OutputFolderError, match="not a garment-world build"):
        build_world(tmp_path / "d", seed=0, **tiny)


def test_deepfashion2_layout_readers_and_ground_truth(world: tuple[Path, dict]) -> None:
    root, summary = world
    df2 = root / "deepfashion2"
    seen_categories: set[int] = set()
    for split in ("train", "validation"):
        items = load_items(df2, split, with_geometry=True, cache=False, progress=False)
        images = {it.image_id for it in items}
        assert len(images) == summary["counts"][f"deepfashion2_{split}_images"]
        assert check_dataset("deepfashion2", root=df2, split=split, images=True).ok
        for item in items:
            seen_categories.add(item.category_id)
            width, height = open_image(df2, split, item.image_id).size
            x1, y1, x2, y2 = item.bbox
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            assert len(item.landmarks) == 3 * KEYPOINT_COUNTS[item.category_id]
            assert item.segmentation and all(len(p) >= 6 for p in item.segmentation)
            assert all(getattr(item, f) in (1, 2, 3) for f in ("scale", "occlusion", "zoom_in", "viewpoint"))
            assert item.style in (0, 1)
            if item.source == "shop":
                assert (item.style, item.viewpoint, item.occlusion, item.zoom_in) == (1, 1, 1, 1)
        per_image: dict[int, int] = {}
        for item in items:
            per_image[item.image_id] = per_image.get(item.image_id, 0) + 1
        assert max(per_image.values()) >= 2 and max(per_image.values()) <= 3  # outfits of 1-3 garments
        users = [it for it in items if it.source == "user"]
        assert {it.occlusion for it in users} >= {1, 2} and {it.viewpoint for it in users} >= {1, 2}
        shop_pairs = {it.pair_id for it in items if it.source == "shop"}
        assert shop_pairs == {it.pair_id for it in users if it.style == 1}  # every user garment has a listing
    assert len(seen_categories) == len(CATEGORIES)
    validation = load_items(df2, "validation", cache=False, progress=False)
    by_item = deepfashion2_truth(load_truth(root), "validation")
    assert sorted(by_item) == sorted((it.image_id, it.item_index) for it in validation)
    assert all(by_item[(it.image_id, it.item_index)]["category"] == it.category_name for it in validation)
    query_gt, gallery_gt = build_retrieval_ground_truth(validation)
    assert json.loads((df2 / "validation" / "query_gt.json").read_text()) == query_gt
    assert json.loads((df2 / "validation" / "gallery_gt.json").read_text()) == gallery_gt
    train_pairs = {it.pair_id for it in load_items(df2, "train", cache=False, progress=False)}
    assert not train_pairs & {it.pair_id for it in validation}


def test_coco_export_is_indexed_by_pycocotools(world: tuple[Path, dict]) -> None:
    from pycocotools.coco import COCO

    root, _ = world
    df2 = root / "deepfashion2"
    coco_dict = to_coco(
        load_items(df2, "validation", cache=False, progress=False), root=df2, split="validation"
    )
    coco = COCO()
    coco.dataset = coco_dict
    coco.createIndex()
    assert len(coco.getImgIds()) == len(coco_dict["images"]) and len(coco.getAnnIds()) > 0
    for ann in coco.loadAnns(coco.getAnnIds())[:40]:
        mask = coco.annToMask(ann)
        x, y, w, h = ann["bbox"]
        assert mask.sum() > 0.3 * w * h  # the polygons cover most of the visible box


def test_fashioniq_split_is_read_and_scored(world: tuple[Path, dict]) -> None:
    root, summary = world
    fiq = root / "fashioniq"
    truth = load_truth(root)["identities"]
    triplets = 0
    for category in ("dress", "shirt", "toptee"):
        for split in ("train", "val"):
            data = FashionIQ(fiq, category, split)
            assert check_dataset("fashioniq", root=fiq, split=split, category=category).ok
            triplets += len(data)
            for t in data.triplets:
                assert t.reference != t.target and t.target in data.gallery and t.reference in data.gallery
                assert data.image_path(t.reference).suffix == ".jpg" and data.image_path(t.target).is_file()
                ref, tgt = truth[t.reference]["attributes"], truth[t.target]["attributes"]
                assert 1 <= len(difference(ref, tgt)) <= 2 and fiq_category(tgt["category"]) == category
                assert all(c.strip() for c in t.captions)
            if split == "val" and len(data):  # the metric scores a ranking that puts the target first
                rankings = [[t.target, *[n for n in data.gallery if n != t.target]] for t in data.triplets]
                scored = fashioniq_recall({category: rankings}, {category: data.annotations}, ks=(1,))
                assert scored[f"{category}/recall@1"] == 1.0
    assert triplets == summary["counts"]["fashioniq_triplets"] > 10
    train = {p for p, v in truth.items() if v["dataset"] == "fashioniq" and v["split"] == "train"}
    val = {p for p, v in truth.items() if v["dataset"] == "fashioniq" and v["split"] == "val"}
    assert train and val and not {truth[p]["family"] for p in train} & {truth[p]["family"] for p in val}


def test_pretrain_jsonl_and_truth_cover_every_image(world: tuple[Path, dict]) -> None:
    root, summary = world
    lines = {}
    for name in ("train.jsonl", "val.jsonl"):
        rows = [json.loads(line) for line in (root / "pretrain" / name).read_text().splitlines()]
        assert rows and all(set(r) == {"image", "text"} and r["text"].strip() for r in rows)
        for row in rows:
            with Image.open(root / "pretrain" / row["image"]) as image:
                assert image.format == "JPEG"
        lines[name] = rows
    assert len(lines["train.jsonl"]) + len(lines["val.jsonl"]) == summary["counts"]["pretrain_images"]
    truth = load_truth(root)["identities"]
    shown = {img.split("#")[0] for v in truth.values() for img in v["images"]}
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*.jpg")}
    assert shown == on_disk
    families = {
        d: {v["family"] for v in truth.values() if v["dataset"] == d} for d in ("deepfashion2", "pretrain")
    }
    assert not families["deepfashion2"] & families["pretrain"]
    splits = {s: {v["family"] for v in truth.values() if v["dataset"] == "pretrain" and v["split"] == s}
              for s in ("train", "validation")}  # fmt: skip
    assert splits["train"] and splits["validation"] and not splits["train"] & splits["validation"]


def _shape_features(image: Image.Image, box: tuple[float, float, float, float]) -> np.ndarray:
    """HOG (Dalal & Triggs, 2005) of a grey square tile around the box, plus the box's aspect ratio: shape
    cues only, no colour, so the classifier must find the silhouette."""
    from skimage.feature import hog

    x1, y1, x2, y2 = box
    side, cx, cy = max(x2 - x1, y2 - y1), (x1 + x2) / 2, (y1 + y2) / 2
    tile = image.convert("L").crop(
        (int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2))
    )
    grey = np.asarray(tile.resize((48, 48), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return np.r_[
        hog(grey, orientations=8, pixels_per_cell=(8, 8), cells_per_block=(2, 2)),
        np.log((y2 - y1) / (x2 - x1)),
    ]


def test_a_small_classifier_finds_the_category_in_the_pixels(world: tuple[Path, dict]) -> None:
    """Shape features of the item box + logistic regression, trained on the train split and scored on the
    validation identities (disjoint families): well above the 1/13 of chance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root, _ = world
    df2 = root / "deepfashion2"
    data = {}
    for split in ("train", "validation"):
        rows, labels, sources = [], [], []
        for item in load_items(df2, split, cache=False, progress=False):
            rows.append(_shape_features(open_image(df2, split, item.image_id), item.bbox))
            labels.append(item.category_id)
            sources.append(item.source)
        data[split] = (np.stack(rows), np.array(labels), np.array(sources))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    model.fit(*data["train"][:2])
    features, labels, sources = data["validation"]
    accuracy = float(model.score(features, labels))
    shop = sources == "shop"
    shop_accuracy = float(model.score(features[shop], labels[shop]))
    print(f"category accuracy {accuracy:.3f} ({len(labels)} items), shop {shop_accuracy:.3f} ({shop.sum()})")
    assert accuracy >= 0.3 and shop_accuracy >= 0.45, (accuracy, shop_accuracy)


def test_describe_wording() -> None:
    attributes = {
        "category": "short sleeve top", "colour": "navy", "secondary_colour": "white",
        "pattern": "horizontal stripes", "neckline": "v-neck", "length": "cropped", "sleeve": "short",
        "details": ["pockets", "buttons"], "material": "knit",
    }  # fmt: skip
    assert describe(attributes) == (
        "a navy cropped knit short sleeve top with white horizontal stripes, a v-neck and buttons and pockets"
    )
    assert describe(attributes, order=["colour", "category"]) == "a navy short sleeve top"
    assert describe(
        {**attributes, "colour": None, "details": []}, order=["pattern", "colour", "details"]
    ) == ("a short sleeve top with white horizontal stripes")
    rng = np.random.default_rng(0)
    texts = {describe(attributes, rng=rng) for _ in range(30)}
    assert len(texts) > 5 and all("short sleeve top" in t for t in texts)
    with pytest.raises(DataError, match="valid"):
        describe({**attributes, "colour": "teal"})
    with pytest.raises(DataError, match="unknown attribute keys"):
        describe({**attributes, "fit": "slim"})
    assert len(COLOURS) >= 12


def test_relative_captions_name_the_difference() -> None:
    ref = {"category": "long sleeve dress", "colour": "white", "secondary_colour": None, "pattern": "solid",
           "neckline": "crew neck", "length": "regular", "sleeve": "long", "details": [], "material": "cotton"}  # fmt: skip
    tgt = {**ref, "colour": "navy", "length": "long"}
    rng = np.random.default_rng(1)
    for _ in range(10):
        first, second = relative_captions(ref, tgt, rng)
        assert ("navy" in first or "darker" in first) and ("long" in first)
        assert second.strip()
    with pytest.raises(ValueError, match="nothing to caption"):
        relative_captions(ref, dict(ref), rng)


def test_cli_renders_a_world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["data", "garments", "--out", str(tmp_path / "w"), "--seed", "2", "--identities", "3",
            "--cir-identities", "0", "--pretrain-identities", "0", "--size", "96", "--no-progress"]  # fmt: skip
    assert capret_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["counts"]["deepfashion2_train_identities"]
        + summary["counts"]["deepfashion2_validation_identities"]
        == 3
    )
    assert (tmp_path / "w" / "truth.json").is_file() and not (tmp_path / "w" / "fashioniq").exists()
