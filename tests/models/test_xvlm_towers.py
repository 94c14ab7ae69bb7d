"""X-VLM (Swin) and X²-VLM (BEiT-v2) vision streams and checkpoint conversion.

The converted model's image tokens are compared with slow references written from the two repositories' model
definitions (original Swin: windows, shifts, masks, patch merging at the end of a stage; X²-VLM's BEiT: q/v
biases, relative position bias with three extra CLS entries, layer scale, per-token fc_norm then mean), evaluated
directly on the X-VLM-named state dict.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from tiny_blip import save_tiny_blip
from tiny_text import build_tiny_bert

from capret.errors import CheckpointError
from capret.models.dual_stream import DualStreamModel, DualStreamModelConfig, create_dual_stream_model
from capret.models.xvlm_convert import (
    PRESETS,
    XvlmPreset,
    convert_xvlm_state_dict,
    load_xvlm_checkpoint,
    resize_relative_table,
    to_xvlm_state_dict,
    write_xvlm_assets,
)

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = 64
BEIT = ("beit_base_patch16_224", {"patch_size": 16, "embed_dim": 24, "depth": 2, "num_heads": 2})
SWIN = (
    "swin_base_patch4_window7_224",
    {"embed_dim": 8, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4},
)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_blip(tmp_path_factory.mktemp("blip"), image_size=IMAGE)


def _model(
    folder: Path, tower: tuple[str, dict], seed: int = 0, randomize: bool = True, **kw: object
) -> DualStreamModel:
    torch.manual_seed(seed)
    config = DualStreamModelConfig(
        family="blip",
        pretrained=str(folder),
        pretrained_weights=False,
        fusion_layer=1,
        vision_tower=tower[0],
        vision_tower_args=dict(tower[1]),
        embed_dim=8,
        **kw,  # type: ignore[arg-type]
    )
    model = create_dual_stream_model(config).eval()
    with torch.no_grad():  # every weight random and away from its init (zero tables, unit layer scales)
        for p in model.parameters() if randomize else ():
            p.normal_(0.0, 0.2)
    return model


# ------------------------------------------------------------------------------------------------ references
def _ln(x: torch.Tensor, sd: dict, name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=eps)


def _mlp(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    hidden = F.gelu(F.linear(x, sd[f"{name}.fc1.weight"], sd[f"{name}.fc1.bias"]))
    return F.linear(hidden, sd[f"{name}.fc2.weight"], sd[f"{name}.fc2.bias"])


def _pair_index(h: int, w: int) -> torch.Tensor:
    """Relative position of every pair of cells of an h x w grid, as a row of a (2h-1)(2w-1) table."""
    cells = [(i // w, i % w) for i in range(h * w)]
    return torch.tensor(
        [[(a[0] - b[0] + h - 1) * (2 * w - 1) + (a[1] - b[1] + w - 1) for b in cells] for a in cells]
    )


def _attend(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, heads: int, rel: torch.Tensor
) -> torch.Tensor:
    batch, n, c = x.shape
    q, k, v = F.linear(x, weight, bias).reshape(batch, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    scores = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1) + rel
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, c)


def _beit_reference(sd: dict, pixels: torch.Tensor, patch: int, depth: int, heads: int) -> torch.Tensor:
    p = "vision_encoder"
    x = F.conv2d(pixels, sd[f"{p}.patch_embed.proj.weight"], sd[f"{p}.patch_embed.proj.bias"], stride=patch)
    grid = x.shape[-1]
    x = torch.cat([sd[f"{p}.cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    n, table_rows = grid * grid + 1, (2 * grid - 1) ** 2 + 3
    index = torch.empty(n, n, dtype=torch.long)
    index[1:, 1:] = _pair_index(grid, grid)
    index[0, :], index[:, 0], index[0, 0] = table_rows - 3, table_rows - 2, table_rows - 1
    for i in range(depth):
        b = f"{p}.blocks.{i}"
        q_bias, v_bias = sd[f"{b}.attn.q_bias"], sd[f"{b}.attn.v_bias"]
        rel = sd[f"{b}.attn.relative_position_bias_table"][index].permute(2, 0, 1)
        h = _attend(
            _ln(x, sd, f"{b}.norm1", 1e-6),
            sd[f"{b}.attn.qkv.weight"],
            torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]),
            heads,
            rel,
        )
        x = x + sd[f"{b}.gamma_1"] * F.linear(h, sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"])
        x = x + sd[f"{b}.gamma_2"] * _mlp(_ln(x, sd, f"{b}.norm2", 1e-6), sd, f"{b}.mlp")
    tokens = _ln(x[:, 1:], sd, f"{p}.fc_norm", 1e-6)
    return torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)


def _windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    batch, h, w, c = x.shape
    return x.view(batch, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _swin_block(
    x: torch.Tensor, sd: dict, b: str, hw: tuple[int, int], ws: int, shift: int, heads: int
) -> torch.Tensor:
    (h, w), (batch, _, c) = hw, x.shape
    y = _ln(x, sd, f"{b}.norm1", 1e-5).view(batch, h, w, c)
    if shift:
        y = torch.roll(y, (-shift, -shift), (1, 2))
    n_win = (h // ws) * (w // ws)
    rel = sd[f"{b}.attn.relative_position_bias_table"][_pair_index(ws, ws)].permute(2, 0, 1)  # [heads, N, N]
    rel = rel.unsqueeze(0).expand(n_win, -1, -1, -1)
    if shift:  # tokens from different regions of the rolled image do not attend to each other
        region = torch.zeros(1, h, w, 1)
        cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
        for k, (rows, cols) in enumerate((r, s) for r in cuts for s in cuts):
            region[:, rows, cols] = k
        ids = _windows(region, ws).squeeze(-1)
        rel = rel + torch.where(ids[:, :, None] != ids[:, None, :], -100.0, 0.0)[:, None]
    win = _windows(y, ws)
    qkv_w, qkv_b = sd[f"{b}.attn.qkv.weight"], sd[f"{b}.attn.qkv.bias"]
    out = _attend_windows(win, qkv_w, qkv_b, heads, rel)
    out = F.linear(out, sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"])
    out = out.view(batch, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(batch, h, w, c)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    x = x + out.reshape(batch, h * w, c)
    return x + _mlp(_ln(x, sd, f"{b}.norm2", 1e-5), sd, f"{b}.mlp")


def _attend_windows(
    win: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, heads: int, rel: torch.Tensor
) -> torch.Tensor:
    """Attention inside each window; ``rel`` is ``[n_win, heads, N, N]`` (bias + shift mask of each window)."""
    n_win = rel.shape[0]
    outs = []
    for i in range(win.shape[0]):  # windows are batch-major: window i belongs to image i // n_win
        outs.append(_attend(win[i : i + 1], weight, bias, heads, rel[i % n_win]))
    return torch.cat(outs)


def _swin_reference(sd: dict, pixels: torch.Tensor, depths: tuple, heads: tuple, window: int) -> torch.Tensor:
    p = "vision_encoder"
    x = F.conv2d(pixels, sd[f"{p}.patch_embed.proj.weight"], sd[f"{p}.patch_embed.proj.bias"], stride=4)
    batch, c, h, w = x.shape
    x = _ln(x.flatten(2).transpose(1, 2), sd, f"{p}.patch_embed.norm", 1e-5)
    for i, depth in enumerate(depths):
        for j in range(depth):
            ws, shift = (window, 0 if j % 2 == 0 else window // 2) if min(h, w) > window else (min(h, w), 0)
            x = _swin_block(x, sd, f"{p}.layers.{i}.blocks.{j}", (h, w), ws, shift, heads[i])
        if i < len(depths) - 1:  # original Swin merges 2x2 patches at the end of the stage
            g = x.view(batch, h, w, c)
            g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], dim=-1)
            g = _ln(g.reshape(batch, -1, 4 * c), sd, f"{p}.layers.{i}.downsample.norm", 1e-5)
            x = F.linear(g, sd[f"{p}.layers.{i}.downsample.reduction.weight"])
            h, w, c = h // 2, w // 2, 2 * c
    tokens = _ln(x, sd, f"{p}.norm", 1e-5)
    return torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)


# ------------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("tower", [BEIT, SWIN], ids=["x2vlm_beit", "xvlm_swin"])
def test_converted_vision_stream_matches_the_original_definition(blip_dir: Path, tower: tuple) -> None:
    source = _model(blip_dir, tower, seed=0)
    state = to_xvlm_state_dict(source)
    target = _model(blip_dir, tower, seed=1)
    converted, _ = convert_xvlm_state_dict(state, target)
    target.load_state_dict(converted)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        ours = target.vision_model(pixel_values=pixels).last_hidden_state
        if tower is BEIT:
            args = tower[1]
            ref = _beit_reference(state, pixels, args["patch_size"], args["depth"], args["num_heads"])
        else:
            args = tower[1]
            ref = _swin_reference(state, pixels, args["depths"], args["num_heads"], args["window_size"])
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tower", [BEIT, SWIN], ids=["x2vlm_beit", "xvlm_swin"])
def test_round_trip_through_a_checkpoint_file_gives_identical_outputs(
    blip_dir: Path, tmp_path: Path, tower: tuple
) -> None:
    source = _model(blip_dir, tower, seed=0)
    state = to_xvlm_state_dict(source)
    # what a released checkpoint also holds: buffers and heads retrieval does not use
    state[
        "vision_encoder.layers.0.blocks.1.attn_mask"
        if tower is SWIN
        else "vision_encoder.blocks.0.attn.relative_position_index"
    ] = torch.zeros(3)
    state["itm_head.0.weight"], state["temp"] = torch.zeros(2, 2), torch.tensor(0.07)
    torch.save({"model": state}, tmp_path / "xvlm.th")
    target = _model(blip_dir, tower, seed=1)
    dropped = load_xvlm_checkpoint(target, tmp_path / "xvlm.th")
    assert "temp" in dropped and "itm_head.0.weight" in dropped and len(dropped) == 3
    via_config = _model(blip_dir, tower, seed=2, randomize=False, xvlm_checkpoint=str(tmp_path / "xvlm.th"))
    via_config.head.load_state_dict(source.head.state_dict())
    target.head.load_state_dict(source.head.state_dict())  # capret's retrieval head is not in X-VLM
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    tokens = source.tokenize(["a red knee-length dress", "blue jeans"])
    with torch.no_grad():
        expect = source(pixels, tokens["input_ids"], tokens["attention_mask"])
        for model in (target, via_config):
            got = model(pixels, tokens["input_ids"], tokens["attention_mask"])
            torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                model.encode_text(tokens), source.encode_text(tokens), atol=1e-5, rtol=1e-5
            )


def test_conversion_refuses_what_has_no_counterpart(blip_dir: Path) -> None:
    model = _model(blip_dir, BEIT)
    state = to_xvlm_state_dict(model)
    state["vision_encoder.rel_pos_bias.relative_position_bias_table"] = torch.zeros(
        3, 2
    )  # shared bias variant
    state["cross_encoder.encoder.layer.0.attention.self.query.weight"] = torch.zeros(2, 2)  # XVLMPlus
    with pytest.raises(CheckpointError) as info:
        convert_xvlm_state_dict(state, model)
    message = str(info.value)
    assert "cross_encoder.encoder.layer.0.attention.self.query.weight" in message
    assert "vision_model.body.rel_pos_bias.relative_position_bias_table" in message
    swin_state = to_xvlm_state_dict(_model(blip_dir, SWIN))
    with pytest.raises(CheckpointError, match="model keys are not in the checkpoint"):
        convert_xvlm_state_dict(swin_state, model)  # a Swin checkpoint into a BEiT model: everything listed


def test_vision_tower_config_errors(blip_dir: Path) -> None:
    with pytest.raises(ValueError, match="pretrained_weights: false"):
        create_dual_stream_model(
            DualStreamModelConfig(family="blip", pretrained=str(blip_dir), vision_tower=BEIT[0])
        )
    with pytest.raises(ValueError, match="Swin .* or BEiT"):
        _model(blip_dir, ("resnet18", {}))
    with pytest.raises(ValueError, match="mean-pooling variant"):
        _model(blip_dir, (BEIT[0], {**BEIT[1], "global_pool": "token"}))


def test_presets_describe_the_released_models() -> None:
    assert PRESETS["xvlm-base"].vision_tower == "swin_base_patch4_window7_224"
    assert (PRESETS["xvlm-base"].text_layers, PRESETS["xvlm-base"].fusion_layer) == (12, 6)
    assert (
        PRESETS["xvlm-base-384"].image_size == 384 and "window12_384" in PRESETS["xvlm-base-384"].vision_tower
    )
    for name in ("x2vlm-base", "x2vlm-large"):
        assert PRESETS[name].vision_tower.startswith("beit_") and PRESETS[name].fusion_layer == 12
        assert PRESETS[name].text_layers == 18 and PRESETS[name].embed_dim == 256


def test_convert_xvlm_command_writes_a_folder_that_loads_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from capret.cli.main import main

    bert = build_tiny_bert(tmp_path / "bert")
    preset = XvlmPreset(
        BEIT[0], text_layers=3, fusion_layer=2, hidden_size=32, num_heads=2, intermediate_size=64,
        tokenizer=str(bert), image_size=32, embed_dim=16,
        vision_tower_args={"patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2},
    )  # fmt: skip
    monkeypatch.setitem(PRESETS, "tiny-x2vlm", preset)
    source_dir = tmp_path / "source"
    entries = write_xvlm_assets(source_dir, "tiny-x2vlm")
    torch.manual_seed(0)
    source = create_dual_stream_model(DualStreamModelConfig(**entries)).eval()
    assert len(source.text_encoder.encoder.layer) == 3 and source.vision_model.kind == "beit"
    torch.save({"model": to_xvlm_state_dict(source)}, tmp_path / "x2vlm.th")

    out = tmp_path / "x2vlm_assets"
    assert (
        main(
            [
                "convert-xvlm",
                "--preset",
                "tiny-x2vlm",
                "--out",
                str(out),
                "--checkpoint",
                str(tmp_path / "x2vlm.th"),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["dropped_keys"] == [] and report["model"]["fusion_layer"] == 2
    section = yaml.safe_load((out / "model.yaml").read_text())["model"]
    assert section["xvlm_checkpoint"] == str(tmp_path / "x2vlm.th") and section["pretrained"] == str(out)
    loaded = create_dual_stream_model(DualStreamModelConfig(**section)).eval()
    loaded.head.load_state_dict(source.head.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    tokens = source.tokenize(["a striped shirt", "black trousers"])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixels, tokens["input_ids"], tokens["attention_mask"]),
            source(pixels, tokens["input_ids"], tokens["attention_mask"]),
            atol=1e-5,
            rtol=1e-5,
        )
    with pytest.raises(SystemExit):
        main(["convert-xvlm", "--out", str(out)])  # --preset is required
    assert main(["convert-xvlm", "--preset", "nope", "--out", str(tmp_path / "x")]) != 0


def test_tower_model_saves_and_reloads_without_the_x_vlm_checkpoint(blip_dir: Path, tmp_path: Path) -> None:
    source = _model(blip_dir, SWIN)
    state = to_xvlm_state_dict(source)
    torch.save({"model": state}, tmp_path / "xvlm.th")
    model = _model(blip_dir, SWIN, randomize=False, xvlm_checkpoint=str(tmp_path / "xvlm.th"))
    model.save_pretrained(tmp_path / "saved")
    (tmp_path / "xvlm.th").unlink()  # the saved folder is self-contained
    reloaded = DualStreamModel.from_pretrained(tmp_path / "saved").eval()
    assert reloaded.config.vision_tower == SWIN[0] and reloaded.config.xvlm_checkpoint is None
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(pixels), model.encode_image(pixels))


def test_exported_names_are_the_released_checkpoints_names(blip_dir: Path) -> None:
    """Pinned to X-VLM's models/xbert.py, the original Swin and X²-VLM's models/beit2.py: a rename upstream
    (transformers or timm) shows up here, not as a checkpoint that no longer converts."""
    swin = set(to_xvlm_state_dict(_model(blip_dir, SWIN)))
    beit = set(to_xvlm_state_dict(_model(blip_dir, BEIT)))
    shared = {
        "text_encoder.embeddings.word_embeddings.weight",
        "text_encoder.embeddings.token_type_embeddings.weight",
        "text_encoder.embeddings.LayerNorm.weight",
        "text_encoder.encoder.layer.0.attention.self.query.weight",
        "text_encoder.encoder.layer.0.attention.output.LayerNorm.bias",
        "text_encoder.encoder.layer.0.intermediate.dense.weight",
        "text_encoder.encoder.layer.0.output.dense.weight",
        "text_encoder.encoder.layer.1.crossattention.self.key.weight",
        "text_encoder.encoder.layer.1.crossattention.output.dense.weight",
        "vision_proj.weight",
        "text_proj.bias",
        "bbox_head.0.weight",
        "bbox_head.1.weight",  # LayerNorm of build_mlp
        "bbox_head.3.bias",
    }
    assert shared <= swin and shared <= beit
    assert not any("crossattention" in k for k in swin if k.startswith("text_encoder.encoder.layer.0."))
    assert {
        "vision_encoder.patch_embed.proj.weight",
        "vision_encoder.patch_embed.norm.weight",
        "vision_encoder.layers.0.blocks.1.attn.relative_position_bias_table",
        "vision_encoder.layers.0.blocks.0.attn.qkv.bias",
        "vision_encoder.layers.0.downsample.reduction.weight",  # merging at the end of stage 0
        "vision_encoder.layers.0.downsample.norm.weight",
        "vision_encoder.norm.weight",
    } <= swin
    assert not any(k.startswith("vision_encoder.layers.1.downsample") for k in swin)  # last stage: none
    assert {
        "vision_encoder.cls_token",
        "vision_encoder.blocks.0.attn.q_bias",
        "vision_encoder.blocks.0.attn.v_bias",
        "vision_encoder.blocks.0.attn.qkv.weight",
        "vision_encoder.blocks.0.attn.relative_position_bias_table",
        "vision_encoder.blocks.0.gamma_1",
        "vision_encoder.blocks.1.gamma_2",
        "vision_encoder.fc_norm.weight",
    } <= beit
    assert "vision_encoder.pos_embed" not in beit and "vision_encoder.blocks.0.attn.qkv.bias" not in beit


@pytest.mark.parametrize(
    "tower, new",
    [(BEIT, {"image": 96}), (SWIN, {"image": IMAGE, "window_size": 8})],
    ids=["beit_new_resolution", "swin_new_window"],
)
def test_relative_tables_are_resampled_for_a_new_resolution_or_window(
    blip_dir: Path, tmp_path: Path, tower: tuple, new: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """X-VLM fine-tunes its 224 px checkpoint at 384 px with window 12; the tables follow the new grid."""
    state = to_xvlm_state_dict(_model(blip_dir, tower))
    folder = (
        blip_dir if new["image"] == IMAGE else save_tiny_blip(tmp_path / "blip96", image_size=new["image"])
    )
    args = {**tower[1], **{k: v for k, v in new.items() if k != "image"}}
    target = _model(folder, (tower[0], args), seed=1)
    with caplog.at_level("INFO", logger="capret.models.xvlm_convert"):
        converted, _ = convert_xvlm_state_dict(state, target)
    assert "resampled" in caplog.text
    target.load_state_dict(converted)
    tables = [k for k in converted if k.endswith("relative_position_bias_table")]
    assert tables and all(converted[k].shape == target.state_dict()[k].shape for k in tables)
    source_key = "vision_encoder." + tables[0].removeprefix("vision_model.body.")
    assert converted[tables[0]].shape[0] > state[source_key].shape[0]
    window = target.get_submodule(tables[0].removesuffix(".relative_position_bias_table")).window_size
    # X-VLM's / BEiT's spline resampling (tests/models/test_xvlm_resize.py), not timm's linear resize
    torch.testing.assert_close(converted[tables[0]], resize_relative_table(state[source_key], tuple(window)))
    if tower is BEIT:  # the three CLS entries (cls->token, token->cls, cls->cls) are kept as they are
        torch.testing.assert_close(converted[tables[0]][-3:], state[source_key][-3:])
    with torch.no_grad():
        out = target.vision_model(
            pixel_values=torch.randn(1, 3, new["image"], new["image"])
        ).last_hidden_state
    assert torch.isfinite(out).all()
