"""No default caption reads the garment world's truth: rewriting truth.json and every attribute field of the
annotations leaves the template backend's captions (with a trained category model) byte-for-byte the same.

Extends tests/captioning/test_pixel_captions.py (annotation edits) to the world's truth file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capret.data.garments import build_world
from capret.data.garments.vocab import CATEGORIES, COLOURS, DETAILS, MATERIALS, PATTERNS
from captioning.category import category_model_dir
from captioning.cli import main as caption_main
from captioning.store import read_records


def _caption(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert caption_main([*argv, "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def _rewrite_truth(root: Path) -> None:
    """Give every identity other attributes (each field moved to another vocabulary value)."""
    path = root / "truth.json"
    truth = json.loads(path.read_text())
    colours = list(COLOURS)
    for entry in truth["identities"].values():
        a = entry["attributes"]
        a["category"] = CATEGORIES[(CATEGORIES.index(a["category"]) + 5) % len(CATEGORIES)]
        a["colour"] = colours[(colours.index(a["colour"]) + 3) % len(colours)]
        a["pattern"] = PATTERNS[(PATTERNS.index(a["pattern"]) + 1) % len(PATTERNS)]
        a["material"] = MATERIALS[(MATERIALS.index(a["material"]) + 1) % len(MATERIALS)]
        a["details"] = [d for d in DETAILS if d not in a["details"]]
    path.write_text(json.dumps(truth))


def _edit_annotations(root: Path, split: str) -> None:
    """Change every attribute field of every item: category, style, viewpoint, occlusion, scale, zoom."""
    for path in sorted((root / split / "annos").glob("*.json")):
        anno = json.loads(path.read_text())
        for name, item in anno.items():
            if name.startswith("item"):
                item["category_id"] = 1 + item["category_id"] % 13
                item["category_name"] = CATEGORIES[item["category_id"] - 1]
                item["style"] = 1 - min(item["style"], 1)
                for field in ("viewpoint", "occlusion", "scale", "zoom_in"):
                    item[field] = 1 + item[field] % 3
        path.write_text(json.dumps(anno))


def test_truth_and_annotation_edits_leave_default_captions_unchanged(tmp_path: Path, capsys) -> None:
    world = tmp_path / "world"
    build_world(world, seed=11, identities=8, cir_identities=0, pretrain_identities=0, size=128)
    df2 = world / "deepfashion2"
    train_store = tmp_path / "captions.train.jsonl"
    _caption(["--root", str(df2), "--split", "train", "--out", str(train_store), "--train-category-model",
              "--category-seconds", "3"], capsys)  # fmt: skip
    base = [
        "--root",
        str(df2),
        "--split",
        "validation",
        "--category-model",
        str(category_model_dir(train_store)),
    ]
    before = read_records(_caption([*base, "--out", str(tmp_path / "a.jsonl")], capsys)["out"])
    truth_before = (world / "truth.json").read_text()
    _rewrite_truth(world)
    _edit_annotations(df2, "validation")
    assert (world / "truth.json").read_text() != truth_before
    after = read_records(_caption([*base, "--out", str(tmp_path / "b.jsonl")], capsys)["out"])
    assert sorted(before) == sorted(after) and len(before) >= 8
    for key, record in before.items():
        assert record["caption"] == after[key]["caption"], key
        assert record["dialogue"] == after[key]["dialogue"], key
        assert record["category"] == after[key]["category"], key
        assert record["oracle"] is False
