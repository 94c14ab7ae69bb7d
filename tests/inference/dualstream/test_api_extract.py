"""``capret.load_model`` / ``encode_images`` / ``encode_captions`` and ``capret-extract`` on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_text import save_tiny_dual_stream  # noqa: E402

import capret  # noqa: E402
import capret.api  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api")
    save_tiny_dual_stream(root / "model", pad="squarepad")
    rng = np.random.default_rng(0)
    images = root / "images" / "sub"
    images.mkdir(parents=True)
    for i in range(7):
        size = (40 + 3 * i, 30 + 5 * i)
        Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(
            images / f"im{i}.png"
        )
    captions = root / "captions.jsonl"
    meta = {
        "dialogue": [],
        "backend": "test",
        "model": {},
        "prompt_version": "t",
        "created": "2024-01-01T00:00:00",
    }
    lines = [
        json.dumps({"key": f"sub/im{i}", "caption": f"a red top number {i}", **meta}) for i in range(0, 7, 2)
    ]
    captions.write_text("\n".join(lines) + "\n")
    return {"root": root, "model": root / "model", "images": root / "images", "captions": captions}


def _paths(assets: dict[str, Path]) -> list[Path]:
    return sorted((assets["images"] / "sub").glob("*.png"))


def test_encode_images_batched_equals_per_image_loop(assets: dict[str, Path]) -> None:
    model = capret.load_model(assets["model"], device="cpu")
    paths = _paths(assets)
    batched = model.encode_images(paths, batch_size=4, num_workers=2)
    assert batched.shape == (7, 24) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, rtol=1e-5)
    # Obvious reference: one image at a time through the model's own preprocessing.
    loop = []
    with torch.no_grad():
        for path in paths:
            pixels, _ = model.transform(Image.open(path).convert("RGB"))
            loop.append(model.model.encode_image(pixels[None])[0].numpy())
    np.testing.assert_allclose(batched, np.stack(loop), atol=1e-5)
    pil = model.encode_images([Image.open(p) for p in paths[:3]])
    np.testing.assert_allclose(pil, batched[:3], atol=1e-5)
    tensors = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths[:3]]
    np.testing.assert_allclose(model.encode_images(tensors), batched[:3], atol=1e-5)
    np.testing.assert_allclose(
        model.encode_images([t.float() / 255 for t in tensors]), batched[:3], atol=1e-5
    )


def test_captions_change_embeddings_and_none_means_image_only(assets: dict[str, Path]) -> None:
    model = capret.load_model(assets["model"])
    paths = _paths(assets)[:4]
    image_only = model.encode_images(paths)
    mixed = model.encode_images(paths, ["a red top", None, "blue trousers", None], batch_size=3)
    np.testing.assert_allclose(mixed[[1, 3]], image_only[[1, 3]], atol=1e-5)
    assert np.abs(mixed[[0, 2]] - image_only[[0, 2]]).max() > 1e-4
    text = model.encode_captions(["a red top", "blue trousers", "a red top"])
    assert text.shape == (3, 16)
    np.testing.assert_allclose(text[0], text[2], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="2 captions for 4 images"):
        model.encode_images(paths, ["a", "b"])
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        model.encode_images([assets["root"] / "nothing.png"])
    with pytest.raises(FileNotFoundError, match="not a capret model folder"):
        capret.load_model(assets["images"])


def test_extract_cli_writes_shards_ids_and_rank_splits(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from capret.cli.extract import main

    out = tmp_path / "feats"
    argv = ["--checkpoint", str(assets["model"]), "--images", str(assets["images"]), "--out", str(out)]
    assert (
        main([*argv, "--shard-size", "3", "--captions", str(assets["captions"]), "--precision", "fp32"]) == 0
    )
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["images"] == 7 and manifest["captions"] == {"found": 4, "missing": 3}
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 1]
    feats = np.concatenate([np.load(out / s["features"]) for s in manifest["shards"]])
    ids = [i for s in manifest["shards"] for i in np.load(out / s["ids"]).tolist()]
    assert ids == [f"sub/im{i}" for i in range(7)]
    from capret.inference.dualstream.extract import read_extraction

    read_feats, read_ids = read_extraction(out)
    assert read_ids == ids and np.array_equal(read_feats, feats)
    model = capret.load_model(assets["model"])
    captions = [f"a red top number {i}" if i % 2 == 0 else None for i in range(7)]
    np.testing.assert_allclose(feats, model.encode_images(_paths(assets), captions), atol=1e-5)

    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"images/sub/im{i}.png\tid{i}\n" for i in range(7)))
    (tmp_path / "images").symlink_to(assets["images"])  # a link out of the list's folder: allowed explicitly
    parts = []
    for rank in (0, 1):  # what torchrun sets for each process
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        argv = ["--checkpoint", str(assets["model"]), "--images", str(listing), "--out", str(tmp_path / "r")]
        assert main([*argv, "--follow-symlinks"]) == 0
        capsys.readouterr()
        shard = json.loads((tmp_path / "r" / f"manifest_r{rank}.json").read_text())["shards"][0]
        parts.append(np.load(tmp_path / "r" / shard["ids"]).tolist())
    assert parts == [[f"id{i}" for i in range(0, 7, 2)], [f"id{i}" for i in range(1, 7, 2)]]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert (
        main(["--checkpoint", str(assets["model"]), "--images", str(tmp_path / "none"), "--out", str(out)])
        == 2
    )


def test_the_folder_says_its_kind_and_one_written_before_kind_still_loads(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    legacy = tmp_path / "legacy"
    shutil.copytree(assets["model"], legacy)
    meta = json.loads((legacy / "capret_model.json").read_text())
    assert meta["kind"] == "dualstream"
    del meta["kind"]
    (legacy / "capret_model.json").write_text(json.dumps(meta))
    paths = _paths(assets)[:2]
    old = capret.load(legacy, device="cpu")
    assert isinstance(old, capret.api.RetrievalModel)
    np.testing.assert_allclose(
        old.encode_images(paths),
        capret.load_model(assets["model"], device="cpu").encode_images(paths),
        atol=1e-6,
    )
