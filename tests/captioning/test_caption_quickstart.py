"""The quickstart's captions stage on a small demo dataset: every item of both splits, keyed by Item.key,
captioned from pixels with the category of a category model trained on the train split."""

from __future__ import annotations

from pathlib import Path

from capret.data.deepfashion2 import load_items
from capret.data.demo import build_demo_dataset
from capret.quickstart import QuickstartContext
from capret.quickstart import captions as stage
from capret.quickstart.captions import run
from captioning.store import read_records


def test_captions_stage_captions_every_demo_item_and_resumes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(stage, "CATEGORY_SECONDS", 3.0)  # the stage's budget caps every member's steps
    data = tmp_path / "data"
    build_demo_dataset(data, seed=0, num_identities=6, progress=False)
    ctx = QuickstartContext(out_dir=tmp_path, data_root=data)
    result = run(ctx)
    total = 0
    captions = set()
    for split in ("train", "validation"):
        # image ids restart at 1 in every split (as in DeepFashion2), so each split has its own store
        path = ctx.state["captions"][split]
        assert path == tmp_path / f"captions.{split}.jsonl"
        keys = sorted(item.key for item in load_items(data, split, progress=False))
        records = read_records(path)
        assert sorted(records) == keys and keys[0].startswith("deepfashion2/")
        assert all(r["backend"] == "template" and len(r["dialogue"]) >= 3 for r in records.values())
        assert all(r["oracle"] is False and r["caption_source"] == "pixels" for r in records.values())
        assert all(r["category"]["source"] == "category-model" for r in records.values())
        assert ctx.state["predicted_categories"][split] == {
            k: r["category"]["name"] for k, r in records.items()
        }
        total += len(keys)
        captions |= {r["caption"] for r in records.values()}
    assert result["captioned"] == total and result["skipped"] == 0 and result["failed"] == 0
    assert result["example"] in captions
    assert result["caption_source"] == "pixels"
    model = result["category_model"]
    assert model["dir"] == str(tmp_path / "captions.train.category_model")
    assert (tmp_path / "captions.train.category_model" / "model.safetensors").is_file()
    for key in ("heldout_accuracy", "validation_accuracy", "chance_accuracy"):
        assert 0.0 <= model[key] <= 1.0
    assert model["kind"] == "pixel-cnn" and model["config"]["members"] == len(model["steps"]) == 3
    assert model["seconds"] < 30.0
    again = run(QuickstartContext(out_dir=tmp_path, data_root=data))
    assert again["captioned"] == 0 and again["skipped"] == total and again["example"]
    assert again["category_model"] == model  # the saved model is reused, not retrained


def test_a_saved_model_of_another_kind_is_replaced_with_the_captions_it_named(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(stage, "CATEGORY_SECONDS", 2.0)
    data = tmp_path / "data"
    build_demo_dataset(data, seed=0, num_identities=6, progress=False)
    monkeypatch.setattr(stage, "CATEGORY_KIND", "pixel-mlp")
    first = run(QuickstartContext(out_dir=tmp_path, data_root=data))
    assert first["category_model"]["kind"] == "pixel-mlp"
    monkeypatch.setattr(stage, "CATEGORY_KIND", "pixel-cnn")
    second = run(QuickstartContext(out_dir=tmp_path, data_root=data))
    assert second["category_model"]["kind"] == "pixel-cnn"
    assert second["captioned"] == first["captioned"] and second["skipped"] == 0  # captioned again
    records = read_records(tmp_path / "captions.validation.jsonl")
    assert {r["model"]["category_model"]["kind"] for r in records.values()} == {"pixel-cnn"}
