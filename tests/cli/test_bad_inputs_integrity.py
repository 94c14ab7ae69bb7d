"""Integrity on read: corrupted shards, indexes and weights, and NaN models, are refused with one line naming the
file (or the model and the first bad row); ``--no-verify`` is the explicit way to skip the checksums.

Same contract as ``test_bad_inputs.py``: ``main(argv)`` exits 2 with one ``error:`` line, no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli_checks import expect_error  # noqa: E402
from tiny_text import save_tiny_dual_stream  # noqa: E402

from capret.cli import extract as extract_cli  # noqa: E402
from capret.cli import main as capret_cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model")
    return save_tiny_dual_stream(root / "model", pad="squarepad")


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """The tiny model with every weight NaN, saved properly (its checksum matches: the bytes are as written)."""
    import torch

    from capret.models.dual_stream import DualStreamModel

    model = DualStreamModel.from_pretrained(model_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    out = tmp_path_factory.mktemp("nan") / "nan_model"
    shutil.copytree(model_dir, out)  # encoder assets; weights and config rewritten below
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shop")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, size=(30, 36, 3), dtype=np.uint8)).save(
            folder / f"{i + 1:06d}.png"
        )
    return folder


def _pipeline(root: Path, model_dir: Path, shop: Path, *extra: str) -> Path:
    from capret.inference.query.pipeline import PipelineConfig

    argv = ["index", "build", "--checkpoint", str(model_dir), "--images", str(shop), "--out",
            str(root / "gallery"), "--no-progress", *extra]  # fmt: skip
    assert capret_cli.main(argv) == 0
    PipelineConfig(model=str(model_dir), gallery="../gallery", captioner=None).save(root / "pipeline")
    return root / "pipeline"


def _flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_gallery_shard_is_refused_naming_it(
    tmp_path: Path, model_dir: Path, shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = _pipeline(tmp_path, model_dir, shop)
    argv = ["search", "--pipeline", str(pipeline), "--gallery-id", "000001/0", "--json"]
    assert capret_cli.main(argv) == 0
    shard = next((tmp_path / "gallery" / "features").glob("features_r0_*.npy"))
    _flip_byte(shard)  # the last float of the last row
    expect_error(capsys, capret_cli.main, argv, shard.name, "SHA-256", "--no-verify")
    capsys.readouterr()
    assert capret_cli.main([*argv, "--no-verify"]) == 0  # skipped on request, and said so
    assert "not checked" in capsys.readouterr().err


def test_flipped_byte_in_the_index_or_items_is_refused(
    tmp_path: Path, model_dir: Path, shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = _pipeline(tmp_path, model_dir, shop)
    argv = ["search", "--pipeline", str(pipeline), "--gallery-id", "000001/0"]
    items = next((tmp_path / "gallery" / "features").glob("items_r0_*.jsonl"))
    text = items.read_text()
    items.write_text(text.replace("000002/0", "000009/0"))  # another id: same length, other bytes
    expect_error(capsys, capret_cli.main, argv, items.name, "SHA-256")
    items.write_text(text)
    _flip_byte(tmp_path / "gallery" / "index.faiss")
    expect_error(capsys, capret_cli.main, argv, "index.faiss", "SHA-256")


def test_ivfpq_gallery_index_files_are_verified(tmp_path: Path) -> None:
    from capret.errors import DataError
    from capret.retrieval.sharded import ShardedIVFIndex, ShardWriter, build_ivf_from_shards, open_features

    rng = np.random.default_rng(0)
    data = rng.normal(size=(300, 8)).astype(np.float32)
    ShardWriter(tmp_path / "feats", dim=8).write(0, data, [{"id": str(i)} for i in range(300)])
    build_ivf_from_shards(open_features(tmp_path / "feats"), tmp_path / "index", nlist=4, m=2, max_train=300)
    settings = json.loads((tmp_path / "index" / "index.json").read_text())
    assert not Path(settings["features"]).is_absolute()  # the folder pair can be moved together
    assert ShardedIVFIndex(tmp_path / "index").ntotal == 300
    _flip_byte(tmp_path / "index" / "lists.ivfdata", offset=100)
    with pytest.raises(DataError, match="lists.ivfdata.*SHA-256"):
        ShardedIVFIndex(tmp_path / "index")
    assert ShardedIVFIndex(tmp_path / "index", verify=False).features.verified is False


def test_nan_model_is_refused_by_extraction_and_gallery_build(
    tmp_path: Path, nan_model: Path, shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "feats"
    argv = ["--checkpoint", str(nan_model), "--images", str(shop), "--out", str(out)]
    expect_error(capsys, extract_cli.main, argv, "nan_model", "non-finite", "row 0", "'000001'")
    assert not out.exists()  # the refused run left nothing behind
    build = ["index", "build", "--checkpoint", str(nan_model), "--images", str(shop), "--out",
             str(tmp_path / "gallery"), "--no-progress"]  # fmt: skip
    expect_error(capsys, capret_cli.main, build, "nan_model", "non-finite", "row 0", "000001/0")


def test_read_extraction_refuses_nan_and_checksum_failures(
    tmp_path: Path, model_dir: Path, shop: Path
) -> None:
    from capret.errors import DataError, NonFiniteError
    from capret.inference.dualstream.extract import ExtractionWriter, read_extraction

    out = tmp_path / "feats"
    assert extract_cli.main(["--checkpoint", str(model_dir), "--images", str(shop), "--out", str(out)]) == 0
    features, ids = read_extraction(out)
    assert features.shape[0] == 3 and np.isfinite(features).all() and ids == ["000001", "000002", "000003"]
    shard = next(out.glob("features_r0_*.npy"))
    _flip_byte(shard)
    with pytest.raises(DataError, match=f"{shard.name} fails its checksum"):
        read_extraction(out)
    assert read_extraction(out, verify=False)[0].shape == (3, features.shape[1])  # explicit skip
    # a NaN written with a valid checksum (a writer without the finite check): refused on read all the same
    nan_dir = tmp_path / "nan"
    with ExtractionWriter(nan_dir, rank=0, world_size=1, identity={"model": "m"}) as writer:
        bad = features.copy()
        bad[1, 2] = np.nan
        writer.write_shard(bad, ids)
        writer.publish({"dim": int(features.shape[1])})
    with pytest.raises(NonFiniteError, match=r"row 1"):
        read_extraction(nan_dir)


def test_model_folder_weights_are_checked(
    tmp_path: Path, model_dir: Path, shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    weights = copy / "model.safetensors"
    argv = ["--checkpoint", str(copy), "--images", str(shop), "--out", str(tmp_path / "f")]
    _flip_byte(weights)
    expect_error(capsys, extract_cli.main, argv, "model.safetensors", "SHA-256")
    # an extra tensor, with the checksum record updated (a file saved by another tool): the key is named
    state = load_file(str(model_dir / "model.safetensors"))
    import torch

    save_file({**state, "head.extra_weight": torch.zeros(2)}, str(weights))
    meta = json.loads((copy / "capret_model.json").read_text())
    meta.pop("sha256")
    (copy / "capret_model.json").write_text(json.dumps(meta))
    expect_error(capsys, extract_cli.main, argv, "model.safetensors", "'head.extra_weight'")
    weights.write_bytes((model_dir / "model.safetensors").read_bytes()[:1000])  # truncated
    expect_error(capsys, extract_cli.main, argv, "model.safetensors", "truncated or corrupt")


class _Alarm:
    """A pickle whose loading creates a file: proof that it was (or was not) unpickled."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (os.makedirs, (str(self.flag), "0o755"))


def _pickle_weights(folder: Path, flag: Path) -> Path:
    import pickle

    for path in folder.glob("*.safetensors"):
        path.unlink()
    target = folder / "pytorch_model.bin"
    target.write_bytes(pickle.dumps({"weight": _Alarm(flag)}))
    return target


def test_pickled_or_truncated_hf_weights_are_refused_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tiny_cir import make_tiny_clip
    from tiny_text import build_tiny_bert

    from capret.errors import CheckpointError
    from capret.models.encoders import HFTextEncoder

    flag = tmp_path / "unpickled"
    bert = build_tiny_bert(tmp_path / "bert")
    weights = bert / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=r"model.safetensors.*truncated or corrupt"):
        HFTextEncoder(source=str(bert), pretrained=True)
    pickled = _pickle_weights(bert, flag)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*pickled"):
        HFTextEncoder(source=str(bert), pretrained=True)
    assert not flag.exists() and pickled.is_file()
    clip = make_tiny_clip(tmp_path / "clip")
    _pickle_weights(clip, flag)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (20, 20)).save(images / "a.png")
    argv = ["oti", "--clip", str(clip), "--images", str(images), "--out", str(tmp_path / "t.safetensors")]
    expect_error(capsys, capret_cli.main, argv, "pytorch_model.bin", "pickled", "safetensors")
    assert not flag.exists() and not (tmp_path / "t.safetensors").exists()
