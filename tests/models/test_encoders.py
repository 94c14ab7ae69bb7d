"""Encoders: registry, timm/HF CLIP/HF text streams built tiny from configs, pooling vs a reference, caching."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_text import build_tiny_bert  # noqa: E402

from capret.models.encoders import create_encoder, list_encoders  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("bert"))


def test_registry_lists_and_rejects_unknown() -> None:
    assert {"timm", "hf_clip_vision", "hf_text", "hf_clip_text"} <= set(list_encoders())
    with pytest.raises(KeyError, match="valid names: .*timm"):
        create_encoder("no_such_encoder")
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        create_encoder("timm", source="no_such_net")


def test_timm_cnn_tokens_form_a_grid() -> None:
    enc = create_encoder("timm", source="test_resnet", image_size=64)
    out = enc(torch.randn(2, 3, 64, 64))
    h, w = out.grid
    assert out.tokens.shape == (2, h * w, enc.token_width)
    assert out.pooled.shape == (2, enc.pooled_width)
    assert enc.data_config.image_size == 64 and len(enc.data_config.mean) == 3


def test_timm_vit_tokens_keep_prefix_and_positions() -> None:
    enc = create_encoder("timm", source="test_vit", image_size=32)
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.grid is None  # a ViT embeds positions itself
    assert out.tokens.shape[0] == 2 and out.tokens.shape[-1] == enc.token_width
    assert torch.isfinite(out.pooled).all()


def test_hf_text_mean_pooling_matches_reference(bert_dir: Path) -> None:
    enc = create_encoder("hf_text", source=str(bert_dir), pretrained=True, max_length=16).eval()
    tokens = enc.tokenize(["a red top", "blue trousers with a slim fit and pockets"])
    assert tokens["input_ids"].shape[1] <= 16
    out = enc(**tokens)
    hidden = enc.model(**tokens).last_hidden_state
    for row in range(2):  # obvious per-row reference: mean over the real tokens only
        n = int(tokens["attention_mask"][row].sum())
        torch.testing.assert_close(out.pooled[row], hidden[row, :n].mean(0), rtol=1e-5, atol=1e-6)
    assert out.mask.dtype == torch.bool and out.mask.sum() == tokens["attention_mask"].sum()
    cls = create_encoder("hf_text", source=str(bert_dir), pretrained=True, pooling="cls").eval()
    torch.testing.assert_close(cls(**tokens).pooled, hidden[:, 0])
    with pytest.raises(ValueError, match="pooling 'max'"):
        create_encoder("hf_text", source=str(bert_dir), pooling="max")


def test_frozen_text_encoder_caches_and_stays_in_eval(bert_dir: Path) -> None:
    frozen = create_encoder("hf_text", source=str(bert_dir), pretrained=True, freeze=True)
    plain = create_encoder("hf_text", source=str(bert_dir), pretrained=True, freeze=True, cache_size=0)
    frozen.train()
    assert not frozen.model.training  # no dropout: outputs are a fixed function of the caption
    assert not any(p.requires_grad for p in frozen.parameters())
    tokens = frozen.tokenize(["a red top", "a green skirt with pleats"])
    first = frozen(**tokens)
    assert len(frozen._cache) == 2
    again = frozen(
        **frozen.tokenize(["a green skirt with pleats"])
    )  # different padding, served from the cache
    reference = plain(**tokens)
    torch.testing.assert_close(first.pooled, reference.pooled)
    torch.testing.assert_close(again.pooled[0], reference.pooled[1])


def test_hf_clip_towers_from_tiny_configs(tmp_path: Path, bert_dir: Path) -> None:
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
    )

    vision_dir = tmp_path / "clip_vision"
    CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    ).save_pretrained(vision_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        vision_dir
    )
    vis = create_encoder("hf_clip_vision", source=str(vision_dir))
    out = vis(torch.randn(2, 3, 32, 32))
    assert out.tokens.shape == (2, 1 + 16, 32) and out.pooled.shape == (2, 32)
    assert vis.data_config.image_size == 32
    assets = vis.save_assets(tmp_path / "assets_v")
    again = create_encoder("hf_clip_vision", **assets)
    assert again.model.config.hidden_size == 32

    text_dir = tmp_path / "clip_text"
    tok = AutoTokenizer.from_pretrained(bert_dir)
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            eos_token_id=tok.sep_token_id,
            pad_token_id=tok.pad_token_id,
        )
    ).save_pretrained(text_dir)
    tok.save_pretrained(text_dir)
    txt = create_encoder("hf_clip_text", source=str(text_dir), pretrained=True, max_length=77)
    assert txt.max_length == 32  # capped by the position table
    res = txt(**txt.tokenize(["a red top", "black trousers"]))
    assert res.pooled.shape == (2, 32) and torch.isfinite(res.tokens).all()
