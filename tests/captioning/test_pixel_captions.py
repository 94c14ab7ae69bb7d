"""Default captions are functions of the pixels and the box: editing the annotation never changes them.

The category named in a caption comes from a category model trained on a train split's crops (or from a
detector), never from the annotation; annotation-derived captions exist only under ``--oracle-attributes``,
which every record states.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_vlm import write_deepfashion2

from capret.errors import CheckpointError, DataError
from captioning.backends import CaptionBackend, create_backend
from captioning.category import LabelledRows, category_model_dir, list_category_models, load_category_model
from captioning.category_mlp import (
    FEATURE_DIM,
    MlpTraining,
    cross_fitted_predictions,
    fit_category_model,
    pixel_features,
)
from captioning.cli import main
from captioning.loop import LoopConfig
from captioning.prompts import get_prompt_set
from captioning.runner import caption_targets
from captioning.sources import CaptionTarget, create_source
from captioning.store import CaptionStore, read_records


def _caption(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main([*argv, "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def _edit_annotations(root: Path, split: str) -> None:
    """Change every field a leaky caption could read: category id/name, viewpoint, occlusion, scale, zoom."""
    for path in sorted((root / split / "annos").glob("*.json")):
        anno = json.loads(path.read_text())
        for name, item in anno.items():
            if not name.startswith("item"):
                continue
            item["category_id"] = 1 + item["category_id"] % 13
            item["category_name"] = (
                "long sleeve dress" if item["category_name"] != "long sleeve dress" else "skirt"
            )
            item["viewpoint"] = 1 + item["viewpoint"] % 3
            item["occlusion"] = 1 + item["occlusion"] % 3
            item["scale"] = 1 + item["scale"] % 3
            item["zoom_in"] = 1 + item["zoom_in"] % 3
        path.write_text(json.dumps(anno))


def test_editing_the_annotation_leaves_default_captions_unchanged(tmp_path, capsys) -> None:
    root = tmp_path / "df2"
    write_deepfashion2(root, "train", images=16, items_per_image=2)
    keys = write_deepfashion2(root, "validation", images=8, items_per_image=2)
    train_store = tmp_path / "captions.train.jsonl"
    summary = _caption(["--root", str(root), "--split", "train", "--out", str(train_store),
                        "--train-category-model", "--category-seconds", "5"], capsys)  # fmt: skip
    folder = category_model_dir(train_store)
    assert summary["category_model"] == str(folder) and (folder / "model.safetensors").is_file()
    assert 0.0 <= summary["category_model_metrics"]["heldout_accuracy"] <= 1.0
    train_records = read_records(train_store)
    # the split the model trained on is captioned with out-of-fold predictions, not memorised ones
    assert all(r["category"]["cross_fitted"] is True for r in train_records.values())
    truth = {
        t.key: t.annotation["category_name"] for t in create_source("deepfashion2", root=root, split="train")
    }
    right = [r["category"]["name"] == truth[k] for k, r in train_records.items()]
    assert summary["category_model_metrics"]["cross_fitted_accuracy"] == pytest.approx(np.mean(right))
    base = ["--root", str(root), "--split", "validation", "--category-model", str(folder)]
    before = read_records(_caption([*base, "--out", str(tmp_path / "a.jsonl")], capsys)["out"])
    oracle_before = read_records(
        _caption(["--root", str(root), "--out", str(tmp_path / "o1.jsonl"), "--oracle-attributes"], capsys)[
            "out"
        ]
    )
    _edit_annotations(root, "validation")
    after = read_records(_caption([*base, "--out", str(tmp_path / "b.jsonl")], capsys)["out"])
    oracle_after = read_records(
        _caption(["--root", str(root), "--out", str(tmp_path / "o2.jsonl"), "--oracle-attributes"], capsys)[
            "out"
        ]
    )

    assert sorted(before) == sorted(after) == sorted(keys)
    for key in keys:
        assert before[key]["caption"] == after[key]["caption"], key
        assert before[key]["dialogue"] == after[key]["dialogue"], key
        assert before[key]["category"] == after[key]["category"], key
        assert before[key]["category"]["source"] == "category-model" and before[key]["oracle"] is False
        assert before[key]["model"]["category_model"]["kind"] == "pixel-cnn"  # the default --category-kind
    # the oracle reads the annotation (so the edit shows) and every one of its records says so
    assert all(
        r["oracle"] is True and r["caption_source"] == "oracle-attributes" for r in oracle_after.values()
    )
    assert all(r["category"]["source"] == "annotation" for r in oracle_after.values())
    assert sum(oracle_before[k]["caption"] != oracle_after[k]["caption"] for k in keys) == len(keys)


def test_oracle_and_category_model_exclude_each_other(tmp_path, capsys) -> None:
    root = tmp_path / "df2"
    write_deepfashion2(root, "validation", images=2)
    argv = [
        "--root",
        str(root),
        "--out",
        str(tmp_path / "x.jsonl"),
        "--oracle-attributes",
        "--train-category-model",
    ]
    assert main([*argv, "--no-progress"]) == 2
    assert "--oracle-attributes" in capsys.readouterr().err


def test_category_kind_picks_the_trained_model_and_names_the_valid_ones(tmp_path, capsys) -> None:
    root = tmp_path / "df2"
    write_deepfashion2(root, "train", images=8, items_per_image=2)
    store = tmp_path / "mlp.jsonl"
    argv = ["--root", str(root), "--split", "train", "--out", str(store), "--train-category-model",
            "--category-seconds", "5"]  # fmt: skip
    _caption([*argv, "--category-kind", "pixel-mlp"], capsys)
    assert {r["model"]["category_model"]["kind"] for r in read_records(store).values()} == {"pixel-mlp"}
    bad = [*argv[:5], str(tmp_path / "bad.jsonl"), *argv[6:], "--category-kind", "pixel-rnn", "--no-progress"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "pixel-rnn" in err and "pixel-cnn" in err and "pixel-mlp" in err


def test_category_model_learns_from_pixels_and_round_trips(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rows, labels, groups = [], [], []
    for index in range(60):  # red wide items are "skirt", blue tall items are "trousers"
        kind = index % 2
        image = Image.new("RGB", (64, 64), (240, 240, 240))
        box = (8, 20, 56, 44) if kind == 0 else (20, 4, 44, 60)
        colour = (200, 30, 35) if kind == 0 else (40, 80, 200)
        image.paste(tuple(int(c + rng.integers(-20, 20)) for c in colour), tuple(int(v) for v in box))
        rows.append(pixel_features(image, box))
        labels.append(["skirt", "trousers"][kind])
        groups.append(index // 2)
    features = np.stack(rows)
    assert features.shape == (60, FEATURE_DIM) and np.isfinite(features).all()
    data = LabelledRows(features, labels, groups)
    model = fit_category_model(data, heldout_fraction=0.3, seed=0)
    assert model.metrics["heldout_items"] == 18 and model.metrics["heldout_accuracy"] == 1.0
    assert "pixel-mlp" in list_category_models()
    model.save(tmp_path / "m")
    loaded = load_category_model(tmp_path / "m")
    assert loaded.predict_inputs(features) == model.predict_inputs(features)
    assert loaded.metrics["heldout_accuracy"] == 1.0 and loaded.classes == ["skirt", "trousers"]
    with pytest.raises(FileNotFoundError, match="category_model.json"):
        load_category_model(tmp_path / "nope")
    with pytest.raises(DataError, match="differ"):
        LabelledRows(features, labels[:-1], groups)
    oof = cross_fitted_predictions(data, folds=5)
    assert np.mean([p.name == y for p, y in zip(oof, labels)]) >= 0.95  # separable: right out of fold too
    shuffled = [str(x) for x in np.random.default_rng(1).permutation(labels)]  # labels unrelated to pixels
    noise = fit_category_model(LabelledRows(features, shuffled, groups), heldout_fraction=0.3)
    oof = cross_fitted_predictions(LabelledRows(features, shuffled, groups), folds=5)
    out_of_fold = float(np.mean([p.name == y for p, y in zip(oof, shuffled)]))
    assert out_of_fold < 0.75 and noise.metrics["train_accuracy"] > out_of_fold + 0.05, (
        out_of_fold,
        noise.metrics,
    )


def test_a_pixel_mlp_sidecar_from_before_the_config_key_still_loads(tmp_path) -> None:
    """Sidecars written before category models shared one base class held ``hidden``/``feature_dim`` at the
    top level; they load into the same architecture."""
    model = fit_category_model(
        LabelledRows(np.random.default_rng(0).normal(size=(12, FEATURE_DIM)).astype(np.float32),
                     ["a", "b"] * 6, list(range(12))),
        heldout_fraction=0.0,
        training=MlpTraining(hidden=5, epochs=3),
    )  # fmt: skip
    folder = model.save(tmp_path / "old")
    meta = json.loads((folder / "category_model.json").read_text())
    meta.update(meta.pop("config"))
    (folder / "category_model.json").write_text(json.dumps(meta))
    assert load_category_model(folder).config() == {"hidden": 5, "feature_dim": FEATURE_DIM}
    meta["feature_version"] = "capret-pixfeat-v0"
    (folder / "category_model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="capret-pixfeat-v0"):
        load_category_model(folder)


class _Recorder(CaptionBackend):
    """A backend that answers like the template one and records every message it was sent."""

    name = "recorder"

    def __init__(self) -> None:
        self.inner = create_backend("template")
        self.texts: list[str] = []

    def _keep(self, messages: list[dict]) -> None:
        self.texts.append(json.dumps(messages))

    def ask(self, requests, *, max_tokens):  # type: ignore[no-untyped-def]
        for r in requests:
            self._keep(r.messages)
        return self.inner.ask(requests, max_tokens=max_tokens)

    def answer(self, queries, *, max_tokens):  # type: ignore[no-untyped-def]
        for q in queries:
            self._keep(q.messages)
        return self.inner.answer(queries, max_tokens=max_tokens)

    def describe(self) -> dict:
        return {"name": "recorder"}


def test_prompts_name_a_detector_class_but_never_the_annotation(tmp_path) -> None:
    image = Image.new("RGB", (40, 40), (240, 240, 240))
    annotation = {
        "category_name": "vest dress",
        "category_id": 12,
        "viewpoint": 3,
        "occlusion": 3,
        "scale": 1,
    }
    targets = [
        CaptionTarget(key="d/1/1", open_image=lambda: image, bbox=(5, 5, 30, 35), annotation=annotation),
        CaptionTarget(key="d/1/2", open_image=lambda: image, bbox=(5, 5, 30, 35), annotation=annotation,
                      category="trousers"),  # a detector's class
    ]  # fmt: skip
    backend = _Recorder()
    with CaptionStore(tmp_path / "c.jsonl") as store:
        caption_targets(targets, store=store, backend=backend, prompts=get_prompt_set("capret-chat-v1"),
                        config=LoopConfig(), progress=False)  # fmt: skip
    records = read_records(tmp_path / "c.jsonl")
    assert records["d/1/1"]["category"] == {"name": "", "source": "none"}
    assert records["d/1/2"]["category"] == {"name": "trousers", "source": "detector"}
    assert "trousers" in records["d/1/2"]["caption"]
    sent = "\n".join(backend.texts)
    assert "trousers" in sent and "vest dress" not in sent and "seen from the side" not in sent
