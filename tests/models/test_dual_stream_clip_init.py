"""``model.init_from_clip``: the dual-stream streams start as the towers of an exported CLIP (weights included),
and the saved model needs that folder no more."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from capret.config import load_config
from capret.errors import CapretError
from capret.models.clip_arch import (
    ClipArchConfig,
    TextTowerConfig,
    VisionTowerConfig,
    build_open_clip,
    write_clip_folder,
)
from capret.models.dual_stream import DualStreamModel, DualStreamModelConfig, create_dual_stream_model
from capret.models.openclip_streams import OpenClipTextEncoder, OpenClipVisionEncoder
from capret.tasks.dualstream import DualStreamConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ClipArchConfig(
    embed_dim=16,
    vision=VisionTowerConfig(image_size=32, width=32, layers=1, head_width=16, patch_size=8),
    text=TextTowerConfig(context_length=16, width=32, heads=2, layers=1),
)


def _clip(folder: Path, arch: ClipArchConfig = TINY) -> tuple[torch.nn.Module, Path]:
    model = build_open_clip(arch, seed=11).eval()
    return model, write_clip_folder(folder, model=model, arch=arch, sidecar={})


def _config(folder: Path | None) -> DualStreamModelConfig:
    return load_config(
        DualStreamConfig,
        None,
        [f"model.init_from_clip={folder}", "model.width=32", "model.heads=2", "model.embed_dim=16",
         "model.itc_dim=16", "model.depth=1", "model.text.freeze=false"],
    ).model  # fmt: skip


def test_streams_are_the_clip_towers(tmp_path: Path) -> None:
    clip, folder = _clip(tmp_path / "clip")
    model = create_dual_stream_model(_config(folder)).eval()
    assert isinstance(model.visual, OpenClipVisionEncoder) and isinstance(model.text, OpenClipTextEncoder)
    assert model.config.init_from_clip is None and model.config.visual.source == str(folder)
    assert model.data_config.image_size == 32
    pixels = torch.randn(2, 3, 32, 32)
    tokens = model.tokenize(["a red dress with pockets", "trousers"])
    with torch.no_grad():
        seen = model.visual(pixels)
        read = model.text(tokens["input_ids"], tokens["attention_mask"])
        assert torch.allclose(seen.pooled, clip.encode_image(pixels), atol=1e-6)
        assert torch.allclose(read.pooled, clip.encode_text(tokens["input_ids"]), atol=1e-6)
        assert seen.tokens.shape == (2, 16, 32) and read.tokens.shape == (2, 16, 32)
        model(pixels, tokens["input_ids"], tokens["attention_mask"])  # the fusion runs on the CLIP tokens


def test_saved_model_loads_without_the_clip_folder(tmp_path: Path) -> None:
    _, folder = _clip(tmp_path / "clip")
    model = create_dual_stream_model(_config(folder)).eval()
    with torch.no_grad():
        for p in model.parameters():  # "training": every weight moves away from the CLIP's
            p.add_(0.01)
    saved = model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(folder)
    loaded = DualStreamModel.from_pretrained(saved)
    pixels = torch.randn(3, 3, 32, 32)
    tokens = model.tokenize(["a", "b c", "a navy skirt"])
    with torch.no_grad():
        want = model.encode_query(pixels, tokens)
        assert torch.equal(loaded.encode_query(pixels, loaded.tokenize(["a", "b c", "a navy skirt"])), want)
        assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))


def test_bad_clip_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(CapretError, match="open_clip_config.json"):
        create_dual_stream_model(_config(tmp_path / "nowhere"))
    resnet = ClipArchConfig(
        embed_dim=16,
        vision=VisionTowerConfig(kind="resnet", image_size=32, width=8, layers=1, head_width=8),
        text=TextTowerConfig(context_length=16, width=32, heads=2, layers=1),
    )
    _, folder = _clip(tmp_path / "rn", resnet)
    with pytest.raises(CapretError, match="ResNet"):
        create_dual_stream_model(_config(folder))
    config = _config(folder)
    config.family = "blip"
    with pytest.raises(CapretError, match="init_from_clip"):
        create_dual_stream_model(config)
