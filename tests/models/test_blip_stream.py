"""Family ``blip`` on a tiny random BLIP: same numbers as Hugging Face's BlipForImageTextRetrieval, save/load,
training through the task; the X-VLM converter round trip and its errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_blip import save_tiny_blip  # noqa: E402

from capret.errors import CheckpointError  # noqa: E402
from capret.models.dual_stream import DualStreamModel, DualStreamModelConfig, create_dual_stream_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny")


def _model(folder: Path, **kw: object) -> DualStreamModel:
    config = DualStreamModelConfig(family="blip", pretrained=str(folder), embed_dim=24, **kw)  # type: ignore[arg-type]
    return create_dual_stream_model(config).eval()


def _inputs(model: DualStreamModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tokens = model.tokenize(["a red short sleeve top", "blue trousers with a slim fit", "a dress"])
    return torch.randn(3, 3, 32, 32, generator=gen), tokens


def test_blip_family_matches_hugging_face(blip_dir: Path) -> None:
    from transformers import BlipForImageTextRetrieval

    model = _model(blip_dir)
    hf = BlipForImageTextRetrieval.from_pretrained(blip_dir).eval()
    pixels, tokens = _inputs(model)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    with torch.no_grad():
        feats = model.forward_features(pixels, ids, mask)
        image = hf.vision_model(pixel_values=pixels).last_hidden_state
        fused = hf.text_encoder(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=image
        ).last_hidden_state[:, 0]
        itc = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
        out = model(pixels, ids, mask)
    torch.testing.assert_close(feats.fused_cls, fused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.image_itc, hf.vision_proj(image[:, 0]), atol=1e-5, rtol=1e-5)
    # Hugging Face's ITC score: normalised vision_proj(image CLS) . normalised text_proj(caption-only CLS)
    torch.testing.assert_close(out.image_embedding @ out.text_embedding.T, itc, atol=1e-5, rtol=1e-5)
    assert model.config.itc_dim == 16 and out.embedding.shape == (3, 24) and out.box.shape == (3, 4)
    torch.testing.assert_close(model.encode_text(tokens), out.text_embedding, atol=1e-6, rtol=1e-6)


def test_blip_no_caption_path_and_save_load(blip_dir: Path, tmp_path: Path) -> None:
    model = _model(blip_dir, fusion_layer=1)
    pixels, tokens = _inputs(model)
    has = torch.tensor([True, False, True])
    with torch.no_grad():
        mixed = model(pixels, tokens["input_ids"], tokens["attention_mask"], has_caption=has).embedding
        image_only = model.encode_image(pixels)
    torch.testing.assert_close(mixed[1], image_only[1], atol=1e-5, rtol=1e-5)  # dropped = empty caption
    assert not torch.allclose(mixed[0], image_only[0], atol=1e-4)
    model.save_pretrained(tmp_path / "saved")
    reloaded = DualStreamModel.from_pretrained(tmp_path / "saved")
    assert type(reloaded).__name__ == "BlipDualStreamModel" and reloaded.config.pretrained_weights is False
    with torch.no_grad():
        again = reloaded(pixels, tokens["input_ids"], tokens["attention_mask"], has_caption=has).embedding
    torch.testing.assert_close(again, mixed)


def test_xvlm_round_trip_gives_identical_outputs(blip_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from capret.models.xvlm_convert import convert_xvlm_state_dict, load_xvlm_checkpoint, to_xvlm_state_dict

    source = _model(blip_dir, fusion_layer=1)
    with torch.no_grad():
        for p in source.parameters():  # move away from the saved init so a no-op load would be caught
            p.add_(0.01 * torch.randn_like(p))
    state = to_xvlm_state_dict(source)
    assert "vision_encoder.blocks.0.attn.qkv.weight" in state and "bbox_head.3.weight" in state
    assert "text_encoder.encoder.layer.1.crossattention.self.query.weight" in state
    assert not any("layer.0.crossattention" in k for k in state)  # X-VLM's text-only layer
    state["itm_head.0.weight"] = torch.zeros(64, 32)  # X-VLM heads that retrieval drops
    state["temp"] = torch.tensor(0.07)
    torch.save({"model": state}, tmp_path / "xvlm.pth")
    target = _model(blip_dir, fusion_layer=1)
    dropped = load_xvlm_checkpoint(target, tmp_path / "xvlm.pth")
    assert dropped == ["itm_head.0.weight", "temp"]
    target.head.load_state_dict(source.head.state_dict())  # capret's own head is not in X-VLM checkpoints
    pixels, tokens = _inputs(source)
    with torch.no_grad():
        want = source(pixels, tokens["input_ids"], tokens["attention_mask"])
        got = target(pixels, tokens["input_ids"], tokens["attention_mask"])
    for name in ("embedding", "image_embedding", "text_embedding", "box"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=0, rtol=0)
    # safetensors, through the config field; a non-zero token-type embedding is folded into the positions
    state.pop("itm_head.0.weight")
    state["text_encoder.embeddings.token_type_embeddings.weight"] = torch.ones(2, 32)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "xvlm.safetensors"))
    via_config = _model(blip_dir, fusion_layer=1, xvlm_checkpoint=str(tmp_path / "xvlm.safetensors"))
    key = "text_encoder.embeddings.position_embeddings.weight"
    torch.testing.assert_close(via_config.state_dict()[key], source.state_dict()[key] + 1.0)
    converted, _ = convert_xvlm_state_dict(state, target)
    assert set(converted) == set(target.state_dict())


def test_xvlm_converter_lists_unmatched_keys(blip_dir: Path, tmp_path: Path) -> None:
    from capret.models.xvlm_convert import (
        convert_xvlm_state_dict,
        read_checkpoint_tensors,
        to_xvlm_state_dict,
    )

    model = _model(blip_dir, fusion_layer=1)
    state = to_xvlm_state_dict(model)
    state["vision_encoder.layers.0.blocks.0.attn.relative_position_bias_table"] = torch.zeros(3)  # Swin
    del state["vision_encoder.norm.weight"]
    with pytest.raises(CheckpointError) as info:
        convert_xvlm_state_dict(state, model)
    message = str(info.value)
    assert "relative_position_bias_table" in message and "vision_model.post_layernorm.weight" in message
    with pytest.raises(CheckpointError, match="fusion_layer"):
        convert_xvlm_state_dict(to_xvlm_state_dict(model), _model(blip_dir, fusion_layer=0))

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pickled code ran",))

    torch.save({"model": {"x": Evil()}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint_tensors(tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint_tensors(tmp_path / "missing.pth")


@pytest.mark.parametrize(
    "tower",
    [{}, {"pretrained_weights": False, "vision_tower": "beit_base_patch16_224",
          "vision_tower_args": {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2}}],
    ids=["blip_vit", "x2vlm_beit"],
)  # fmt: skip
def test_blip_family_trains_through_the_task(blip_dir: Path, tmp_path: Path, tower: dict) -> None:
    from tiny_text import write_synthetic_df2

    from capret.config import from_dict
    from capret.tasks.dualstream import DualStreamConfig, run

    stores = write_synthetic_df2(tmp_path / "data", identities={"train": 4, "validation": 2}, user_views=1)
    config = from_dict(
        DualStreamConfig,
        {
            "data": {"root": str(tmp_path / "data"), "captions": str(stores["train"]),
                     "val_captions": str(stores["validation"]), "p": 2, "k": 2},
            "model": {"family": "blip", "pretrained": str(blip_dir), "embed_dim": 16, "mode": "full",
                      "fusion_layer": 1, "text": {"freeze": False, "max_length": 16}, **tower},
            "trainer": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "amp": "off", "progress": False,
                        "tensorboard": False, "warmup_steps": 0},
            "eval": {"ks": [1, 2], "batch_size": 4, "no_captions": False},
        },
    )  # fmt: skip
    result = run(config)
    assert 0.0 <= result["metrics"]["map"] <= 1.0 and "box_miou" in result["metrics"]
    import capret

    loaded = capret.load_model(result["model_dir"])
    assert (
        loaded.encode_images(sorted((tmp_path / "data" / "validation" / "image").glob("*.jpg"))).shape[1]
        == 16
    )
