"""The quickstart's composed-retrieval stage on a tiny rendered world and a tiny CLIP: every method is trained
(for a second or two) and scored by ``evaluate_cir`` on the world's FashionIQ val, beside the shortcuts, and the
world's truth file is never opened."""

from __future__ import annotations

import builtins
import io
import json
import pathlib
from pathlib import Path
from typing import Any

import pytest

from capret.data.garments import build_world
from capret.quickstart import QuickstartContext
from capret.quickstart import cir as stage

#: a world just big enough for every FashionIQ category to hold train and val triplets
TINY_WORLD = {"identities": 4, "cir_identities": 30, "pretrain_identities": 16, "size": 64, "user_views": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(world root, exported tiny CLIP folder) trained for a few steps on the world's own pretraining split."""
    from tiny_pretrain import tiny_clip_config

    from capret.tasks.clip import run as train_clip

    root = tmp_path_factory.mktemp("cirworld")
    world = root / "world"
    build_world(world, seed=1, **TINY_WORLD)
    result = train_clip(tiny_clip_config(world / "pretrain", root / "clip_run", steps=4))
    return world, Path(result["model_dir"])


def _guard_truth(monkeypatch: pytest.MonkeyPatch, opened: list[str]) -> None:
    """Record (and refuse) every open of a file named truth.json, through every way Python opens files."""
    real_open, real_path_open = builtins.open, pathlib.Path.open

    def guarded(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | Path) and Path(file).name == "truth.json":
            opened.append(str(file))
            raise PermissionError(f"the cir stage opened {file}")
        return real_open(file, *args, **kwargs)

    def guarded_path(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name == "truth.json":
            opened.append(str(self))
            raise PermissionError(f"the cir stage opened {self}")
        return real_path_open(self, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)
    monkeypatch.setattr(pathlib.Path, "open", guarded_path)


def test_cir_stage_scores_every_method_without_the_truth(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world, clip_dir = tiny
    truth = world / "truth.json"
    assert truth.is_file()
    hidden = tmp_path / "hidden_truth.json"
    truth.rename(hidden)  # a stage that needs it would fail to find it...
    opened: list[str] = []
    _guard_truth(monkeypatch, opened)  # ...and one that tries is recorded
    out = tmp_path / "qs"
    out.mkdir()
    ctx = QuickstartContext(
        out_dir=out,
        data_root=world / "deepfashion2",
        world_root=world,
        world="garments",
        seed=0,
        train_seconds=3.0,
    )
    ctx.state["clip"] = clip_dir
    try:
        report = stage.run(ctx)
    finally:
        monkeypatch.undo()
        hidden.rename(truth)
    assert opened == []
    json.dumps(report)  # the report is plain JSON
    assert report["benchmark"] == "fashioniq" and report["split"] == "val"
    methods = report["methods"]
    assert list(methods) == list(stage.METHOD_ORDER)
    for name, scores in methods.items():
        for k in stage.KS:
            assert 0.0 <= scores[f"recall@{k}"] <= 1.0, name
        assert scores["recall@1"] <= scores["recall@5"] <= scores["recall@10"] <= scores["recall@50"]
        assert scores["seconds"] > 0
        assert set(scores["per_category"]) == set(report["gallery_sizes"])
    sizes = report["gallery_sizes"]
    # a category without val triplets (this tiny world may leave one empty) is named, not averaged in as NaN
    assert sorted([*sizes, *report["categories_without_val_triplets"]]) == ["dress", "shirt", "toptee"]
    assert all(0 < n < 50 for n in sizes.values())
    # a gallery under 50 images ranked whole: R@50 is 1 and the report says why
    assert all(methods[m]["recall@50"] == 1.0 for m in methods) and "R@50" in report["note"]
    assert report["chance"]["recall@1"] == pytest.approx(sum(1 / n for n in sizes.values()) / len(sizes))
    # the reference is kept in its gallery (CLIP4Cir protocol): the image-only shortcut ranks it first
    assert methods["image-only"]["recall@1"] == 0.0
    combiner = methods["combiner"]
    assert combiner["selected_on"] == "held-out train triplets" and combiner["train_steps"] > 0
    assert combiner["selection_gallery"] > max(sizes.values())
    assert methods["pic2word"]["train_steps"] > 0 and methods["lincir"]["train_steps"] > 0
    assert methods["searle-oti"]["oti_steps"] == 10  # 100 steps x 3 / 90 s, floored at 10
    assert methods["cirevl"]["run"]["total"]["fallbacks"] == 0  # every query got an edited description
    for k, names in report["above_both_shortcuts"].items():
        best = max(methods[s][k] for s in stage.SHORTCUTS)
        assert all(methods[n][k] > best for n in names)


def test_selection_split_holds_out_train_triplets_only(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from capret.data import create_dataset

    world, _ = tiny
    fiq = world / "fashioniq"
    selection = stage.selection_split(fiq, tmp_path / "sel", seed=0)
    val_images = {
        name for c in ("dress", "shirt", "toptee")
        for name in json.loads((fiq / "image_splits" / f"split.{c}.val.json").read_text())
    }  # fmt: skip
    for category, counts in selection["triplets"].items():
        train = json.loads((fiq / "captions" / f"cap.{category}.train.json").read_text())
        parts = {
            s: json.loads((tmp_path / "sel" / "captions" / f"cap.{category}.{s}.json").read_text())
            for s in ("train", "val")
        }
        assert counts == {s: len(v) for s, v in parts.items()} and counts["val"] >= 1
        # the two halves partition the world's train triplets; none of the world's val is in either
        assert sorted(map(json.dumps, parts["train"] + parts["val"])) == sorted(map(json.dumps, train))
        held = create_dataset("fashioniq", root=tmp_path / "sel", split="val", category=category)
        assert len(held) == counts["val"] and not set(held.gallery) & val_images
        assert len(held.gallery) == selection["gallery"]
    assert stage.selection_split(fiq, tmp_path / "sel", seed=0) == selection  # rebuilt the same


def test_note_names_the_cut_offs_a_gallery_saturates() -> None:
    """A gallery no larger than k is ranked whole at R@k; the note says so only when it happens."""
    small = stage._note({"dress": 8, "shirt": 30, "toptee": 60})
    assert "R@10 and above" in small and "R@50" in small
    large = stage._note({"dress": 105, "shirt": 113, "toptee": 88})
    assert "every cut-off ranks part of a gallery" in large and "105" in large


@pytest.mark.slow
def test_quickstart_task_cir_has_galleries_where_r10_means_something(tmp_path: Path) -> None:
    """`capret quickstart --task cir` on the default world: ~100-image val galleries (chance R@10 ~ 0.1), every
    method scored at every cut-off with the chance levels beside them."""
    from capret.cli.main import main

    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--task", "cir"]) == 0
    report = json.loads((out / "report_cir.json").read_text())
    cir = report["cir"]
    assert min(cir["gallery_sizes"].values()) >= 80 and cir["chance"]["recall@10"] < 0.15
    assert list(cir["methods"]) == list(stage.METHOD_ORDER)
    for name, scores in cir["methods"].items():
        assert scores["recall@1"] <= scores["recall@5"] <= scores["recall@10"] <= scores["recall@50"], name
    # the image-only shortcut is far above chance (targets share their reference's family look)
    assert cir["methods"]["image-only"]["recall@10"] > 2 * cir["chance"]["recall@10"]
    assert "every cut-off ranks part of a gallery" in cir["note"]
