"""``capret-train`` task ``clip``: a few steps end to end on a tiny image-text split, the exported folder read back
by every loader with identical embeddings, the metrics against slow references, and bad inputs named."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from repo_paths import CONFIGS
from tiny_pretrain import COLOURS, shape_image, tiny_clip_config, tiny_clip_overrides, write_pretrain_split

import capret
from capret.cli import train as train_cli
from capret.data.image_text import read_image_text_pairs
from capret.errors import CapretError, DataError
from capret.models.clip import load_clip
from capret.models.clip_arch import (
    ClipArchConfig,
    TextTowerConfig,
    VisionTowerConfig,
    build_open_clip,
    load_clip_folder,
    read_clip_sidecar,
    wrap_in_memory,
    write_clip_folder,
)
from capret.models.folder import folder_kind
from capret.tasks.clip import ClipLossConfig, ClipTrainModule, evaluate_clip, retrieval_metrics, run
from capret.tasks.clip import zero_shot_category_accuracy as zs_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ClipArchConfig(
    embed_dim=16,
    vision=VisionTowerConfig(image_size=32, width=32, layers=1, head_width=16, patch_size=8),
    text=TextTowerConfig(context_length=12, width=32, heads=2, layers=1),
)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pretrain_split(tmp_path_factory.mktemp("pretrain"))


@pytest.fixture(scope="module")
def trained(split: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("clip_run")
    return run(tiny_clip_config(split, out, steps=3))


def test_cli_trains_from_the_shipped_config_and_exports_a_clip_folder(
    split: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = train_cli.main(
        ["--config", str(CONFIGS / "garments_clip.yaml"), *tiny_clip_overrides(split, tmp_path)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["steps"] == 3
    folder = Path(result["model_dir"])
    assert folder_kind(folder) == "clip"
    meta = read_clip_sidecar(folder)
    assert meta["format"] == "capret.clip/1" and meta["config"]["arch"]["vision"]["image_size"] == 32
    assert meta["trained_from"]["config"]["task"] == "clip"
    assert set(result["held_out"]) >= {"i2t_recall@1", "t2i_recall@1", "mean_recall@1", "chance_recall@1"}


def test_export_round_trip_gives_identical_embeddings(tmp_path: Path) -> None:
    model = build_open_clip(TINY, seed=3).eval()
    live = wrap_in_memory(model, TINY)
    folder = write_clip_folder(tmp_path / "clip", model=model, arch=TINY, sidecar={"note": "test"})
    image = shape_image("red", "circle", seed=1).resize((50, 37))
    texts = ["a red circle", "two blue stripes on a grey ground"]
    with torch.no_grad():
        want_image = live.encode_image(live.transform(image)[None])
        want_text = live.encode_text(texts)
        for loaded in (
            load_clip_folder(folder),
            load_clip(str(folder), backend="open_clip"),
            capret.load(folder),
        ):
            assert loaded.preprocess_id == live.preprocess_id
            assert torch.equal(loaded.transform(image), live.transform(image))
            assert torch.equal(loaded.encode_image(loaded.transform(image)[None]), want_image)
            assert torch.equal(loaded.encode_text(texts), want_text)


def test_exported_weights_are_the_selected_ones(trained: dict[str, Any], split: Path) -> None:
    """The folder holds the trainer's selected checkpoint: scoring it from disk reproduces the held-out metrics
    the run reported from memory."""
    again = evaluate_clip(trained["model_dir"], split / "val.jsonl")
    assert again == pytest.approx(trained["held_out"], abs=1e-6)
    assert trained["best_checkpoint"] is not None


def test_init_from_continues_from_an_exported_folder(
    trained: dict[str, Any], split: Path, tmp_path: Path
) -> None:
    config = tiny_clip_config(
        split, tmp_path, steps=1, extra=[f"model.init_from={trained['model_dir']}", "model.arch.embed_dim=8"]
    )
    result = run(config)  # the architecture comes from the folder (embed_dim=8 is ignored)
    assert read_clip_sidecar(result["model_dir"])["config"]["arch"]["embed_dim"] == 16


def _slow_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """CLIP's loss written out: mean over rows of -log softmax at the pair, both directions, averaged."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * float(image[i] @ text[j]) for j in range(n)]
        col = [scale * float(image[j] @ text[i]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        total += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    return total / (2 * n)


def test_training_loss_matches_a_slow_reference() -> None:
    model = build_open_clip(TINY, seed=0).eval()
    module = ClipTrainModule(wrap_in_memory(model, TINY), loss=ClipLossConfig(), rank=0, world_size=1)
    pixels = torch.randn(5, 3, 32, 32)
    ids = module.clip.tokenize(["a red square", "a blue circle", "a green stripe", "grey", "a yellow circle"])
    with torch.no_grad():
        terms = module({"pixels": pixels, "input_ids": ids["input_ids"]})
        image = F.normalize(module.clip.image_features(pixels), dim=-1)
        text = F.normalize(module.clip.text_features(ids["input_ids"], ids["attention_mask"]), dim=-1)
    scale = float(model.logit_scale.detach().exp())
    assert scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(_slow_clip_loss(image, text, scale), rel=1e-5)


def test_logit_scale_is_clamped_at_the_configured_maximum() -> None:
    model = build_open_clip(TINY, seed=0)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    module = ClipTrainModule(wrap_in_memory(model, TINY), loss=ClipLossConfig(max_logit_scale=50.0), rank=0,
                             world_size=1)  # fmt: skip
    ids = module.clip.tokenize(["a", "b"])["input_ids"]
    terms = module({"pixels": torch.randn(2, 3, 32, 32), "input_ids": ids})
    assert float(terms["logit_scale"]) == pytest.approx(50.0)


def test_retrieval_metrics_match_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    images, texts = (
        F.normalize(torch.randn(9, 6, generator=g), dim=1),
        F.normalize(torch.randn(9, 6, generator=g), dim=1),
    )
    words = ["a", "b", "c", "a", "d", "e", "f", "g", "h"]  # pairs 0 and 3 share their text
    got = retrieval_metrics(images, texts, texts=words, ks=[1, 3])
    scores = images @ texts.T
    for k in (1, 3):
        hits_i2t = [any(words[j] == words[i] for j in scores[i].topk(k).indices.tolist()) for i in range(9)]
        hits_t2i = [
            any(words[j] == words[i] for j in scores[:, i].topk(k).indices.tolist()) for i in range(9)
        ]
        assert got[f"i2t_recall@{k}"] == pytest.approx(sum(hits_i2t) / 9)
        assert got[f"t2i_recall@{k}"] == pytest.approx(sum(hits_t2i) / 9)
    assert got["chance_recall@1"] == pytest.approx((7 * 1 / 9 + 2 * 2 / 9) / 9)


def test_zero_shot_accuracy_reads_labels_only_to_score(tmp_path: Path) -> None:
    model = build_open_clip(TINY, seed=1).eval()
    clip = wrap_in_memory(model, TINY)
    names = list(COLOURS)
    images = [shape_image(c, "square", seed=i) for i, c in enumerate(names * 2)]
    truth = names * 2
    first = zs_accuracy(clip, images, truth, categories=names)
    wrong = zs_accuracy(clip, images, truth[::-1], categories=names)
    assert first["predictions"] == wrong["predictions"]  # labels never change what is predicted
    assert first["accuracy"] == pytest.approx(sum(p == t for p, t in zip(first["predictions"], truth)) / 8)
    assert first["chance"] == pytest.approx(0.25) and first["count"] == 8
    boxes = [(0.0, 0.0, 20.0, 20.0)] * 8
    cropped = zs_accuracy(clip, images, truth, categories=names, boxes=boxes)
    assert len(cropped["predictions"]) == 8
    with pytest.raises(ValueError, match="not among"):
        zs_accuracy(clip, images, ["purple"] * 8, categories=names)


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "text": "ok"}\n{"image": "b.png"}\n')
    with pytest.raises(DataError, match="line 2"):
        read_image_text_pairs(bad)
    bad.write_text('{"image": "../outside.png", "text": "x"}\n')
    with pytest.raises(DataError, match="outside"):
        read_image_text_pairs(bad)
    folder = write_clip_folder(tmp_path / "m", model=build_open_clip(TINY, seed=0), arch=TINY, sidecar={})
    meta = json.loads((folder / "capret_model.json").read_text())
    (folder / "capret_model.json").write_text(json.dumps({**meta, "kind": "detector"}))
    with pytest.raises(CapretError, match="detector"):
        load_clip_folder(folder)
    with pytest.raises(CapretError, match="missing"):
        load_clip_folder(tmp_path)


@pytest.mark.slow
def test_training_learns_the_tiny_world(tmp_path: Path) -> None:
    """A minute of training on coloured shapes: held-out R@1 and zero-shot colour accuracy well above chance."""
    root = write_pretrain_split(tmp_path / "data", train=192, val=24)
    result = run(tiny_clip_config(root, tmp_path / "run", steps=150, extra=["trainer.eval_every=50",
                                                                            "trainer.lr=0.002"]))  # fmt: skip
    held = result["held_out"]
    assert held["mean_recall@1"] > 3 * held["chance_recall@1"]
    names = list(COLOURS)
    images = [
        shape_image(c, s, seed=900 + i)
        for i, (c, s) in enumerate((c, s) for c in names for s in ("square", "circle"))
    ]
    labels = [c for c in names for _ in range(2)]
    zs = zs_accuracy(result["model_dir"], images, labels, categories=names, templates=("a {} square",))
    assert zs["accuracy"] >= 0.75
