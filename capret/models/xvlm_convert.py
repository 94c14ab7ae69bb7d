"""Load released X-VLM / X²-VLM checkpoints into the ``blip`` dual-stream family (tensors only, no pickle).

X-VLM (Zeng et al., ICML 2022; zengyan-97/X-VLM) and X²-VLM (Zeng et al., 2023; zengyan-97/X2-VLM) save one
state dict (under ``"model"`` in their ``.th``/``.pth`` files) from ``models/xvlm.py``'s ``XVLMBase``: a vision
encoder, a BERT text encoder whose layers from ``text_config.fusion_layer`` on cross-attend to the image (X-VLM
base: 12 layers, fusion from 6; X²-VLM: 18 layers, fusion from 12), ``vision_proj``/``text_proj`` and a box head.
They map one to one onto :class:`~capret.models.blip_stream.BlipDualStreamModel` built with ``fusion_layer = k``
and the matching vision stream:

==========================================================  =====================================================
X-VLM / X²-VLM                                               capret (family ``blip``)
==========================================================  =====================================================
Swin (X-VLM): ``vision_encoder.layers.i.downsample.*``       ``vision_model.body.layers.{i+1}.downsample.*`` (timm
                                                             merges patches at the start of the next stage)
Swin / BEiT (X²-VLM): every other ``vision_encoder.*``       ``vision_model.body.*`` (timm keeps the original names)
DeiT ViT: ``vision_encoder.blocks.i.{norm1,attn.qkv,...}``   BLIP's ViT ``vision_model.encoder.layers.i.{layer_norm1,self_attn.qkv,...}``
``text_encoder[.bert].embeddings/encoder.layer.i.*``         ``text_encoder.embeddings/encoder.layer.i.*``
``text_encoder.embeddings.token_type_embeddings``            folded into ``position_embeddings`` (type 0 is added
                                                             to every token)
``vision_proj`` / ``text_proj`` / ``bbox_head``              ``vision_proj`` / ``text_proj`` / ``box_head``
``itm_head``, ``temp``, MLM head, queues, buffers            not used by retrieval: dropped and reported
==========================================================  =====================================================

The vision stream is chosen by ``model.vision_tower`` (:mod:`capret.models.vision_towers`): a timm Swin for X-VLM,
a timm BEiT (relative position bias, layer scale, mean pooling) for X²-VLM, none (BLIP's ViT) for DeiT-ViT
checkpoints. :data:`PRESETS` holds the released models' sizes and :func:`write_xvlm_assets` writes the config
folder that ``model.pretrained`` points at. The retrieval head (``head``) is capret's own and starts fresh. Keys
that match nothing (a CLIP-ViT vision encoder, XVLMPlus's separate ``cross_encoder``, a shared relative position
bias) make :func:`convert_xvlm_state_dict` raise a :class:`~capret.errors.CheckpointError` listing every one of
them rather than load a partial model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from capret.errors import CheckpointError, ConfigError
from capret.models.convert.common import read_tensor_file

logger = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "XvlmPreset",
    "convert_xvlm_state_dict",
    "load_xvlm_checkpoint",
    "read_checkpoint_tensors",
    "resize_relative_table",
    "to_xvlm_state_dict",
    "write_xvlm_assets",
]

Rule = tuple[str, "str | Callable[[re.Match[str]], str]"]

#: DeiT-ViT vision encoder (X-VLM's ``models/vit.py``) <-> BLIP's ViT, as ``(X-VLM name, capret name)``: one table
#: for loading and exporting, so the two directions cannot drift apart. ``{i}`` is a block index, ``{rest}`` the
#: rest of the key; first match wins.
_VIT_NAMES: tuple[tuple[str, str], ...] = (
    ("vision_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("vision_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("vision_encoder.patch_embed.proj.{rest}", "vision_model.embeddings.patch_embedding.{rest}"),
    ("vision_encoder.blocks.{i}.norm1.{rest}", "vision_model.encoder.layers.{i}.layer_norm1.{rest}"),
    ("vision_encoder.blocks.{i}.norm2.{rest}", "vision_model.encoder.layers.{i}.layer_norm2.{rest}"),
    ("vision_encoder.blocks.{i}.attn.qkv.{rest}", "vision_model.encoder.layers.{i}.self_attn.qkv.{rest}"),
    (
        "vision_encoder.blocks.{i}.attn.proj.{rest}",
        "vision_model.encoder.layers.{i}.self_attn.projection.{rest}",
    ),
    ("vision_encoder.blocks.{i}.mlp.{rest}", "vision_model.encoder.layers.{i}.mlp.{rest}"),
    ("vision_encoder.norm.{rest}", "vision_model.post_layernorm.{rest}"),
)
_PLACEHOLDER = re.compile(r"\{(i|rest)\}")
_PLACEHOLDER_PATTERN = {"i": r"(?P<i>\d+)", "rest": r"(?P<rest>.+)"}


def _name_rule(source: str, target: str) -> Rule:
    """``source`` as a regex (literal dots, placeholders as named groups) with ``target`` as its template."""
    parts = _PLACEHOLDER.split(source)  # literal, name, literal, name, ..., literal
    pattern = "".join(_PLACEHOLDER_PATTERN[x] if k % 2 else re.escape(x) for k, x in enumerate(parts))
    return pattern, _PLACEHOLDER.sub(lambda m: rf"\g<{m[1]}>", target)


_VIT_RULES: tuple[Rule, ...] = tuple(_name_rule(xvlm, ours) for xvlm, ours in _VIT_NAMES)
#: Swin / BEiT vision encoder -> the timm backbone of :class:`~capret.models.vision_towers.TimmVisionTower`
_TOWER_RULES: tuple[Rule, ...] = (
    (  # original Swin merges patches at the end of stage i, timm at the start of stage i + 1
        r"vision_encoder\.layers\.(\d+)\.downsample\.(.+)",
        lambda m: f"vision_model.body.layers.{int(m[1]) + 1}.downsample.{m[2]}",
    ),
    (r"vision_encoder\.(.+)", r"vision_model.body.\1"),
)
#: text encoder and heads (every vision stream)
_SHARED_RULES: tuple[Rule, ...] = (
    (
        r"text_encoder\.(?:bert\.)?(embeddings\.(?:word_embeddings|position_embeddings|LayerNorm)\..+)",
        r"text_encoder.\1",
    ),
    (r"text_encoder\.(?:bert\.)?(encoder\.layer\.\d+\..+)", r"text_encoder.\1"),
    (r"(vision_proj|text_proj)\.(weight|bias)", r"\1.\2"),
    (r"bbox_head\.(\d+)\.(weight|bias)", r"box_head.\1.\2"),
)
#: checkpoint keys that retrieval does not use (reported, never an error): ITM and MLM heads, temperature,
#: momentum queues, non-learned buffers (position ids, relative position indices, Swin's attention masks) and
#: X²-VLM's video frame embedding
_DROPPED = re.compile(
    r"(itm_head\..*|temp|text_encoder\.cls\..*|.*position_ids|text_encoder\.(?:bert\.)?pooler\..*|idx_queue|"
    r"image_queue|text_queue|.*_m\..*|.*_m|vision_encoder\..*relative_position_index|vision_encoder\..*attn_mask|"
    r"absolute_frame_pos_embed)"
)
_TOKEN_TYPE = re.compile(r"text_encoder\.(?:bert\.)?embeddings\.token_type_embeddings\.weight")
#: target keys that capret adds and that start fresh
_NEW = re.compile(r"head\.(weight|bias)")


def _tower_kind(model: nn.Module) -> str | None:
    """``"swin"``/``"beit"`` when ``model`` reads images through a timm tower, ``None`` for BLIP's ViT."""
    from capret.models.vision_towers import TimmVisionTower

    tower = getattr(model, "vision_model", None)
    return tower.kind if isinstance(tower, TimmVisionTower) else None


def _rules(model: nn.Module) -> tuple[Rule, ...]:
    return (_VIT_RULES if _tower_kind(model) is None else _TOWER_RULES) + _SHARED_RULES


def _rename(key: str, rules: tuple[Rule, ...]) -> str | None:
    for pattern, template in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return template(match) if callable(template) else match.expand(template)
    return None


def read_checkpoint_tensors(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file, read by :func:`~capret.models.convert.common.read_tensor_file` (safetensors,
    or a torch file with ``weights_only=True``, so no pickle code runs). A ``{"model": state_dict}`` wrapper, as
    X-VLM saves, is unwrapped."""
    data = read_tensor_file(path)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(
            f"{path}: expected an X-VLM state dict of tensors (optionally under 'model')", path=path
        )
    return dict(data)


def convert_xvlm_state_dict(
    state: dict[str, Tensor], model: nn.Module
) -> tuple[dict[str, Tensor], list[str]]:
    """Rename an X-VLM state dict to ``model``'s keys; returns ``(state dict, dropped keys)``.

    Raises:
        CheckpointError: listing checkpoint keys with no target, target keys the checkpoint does not fill
            (other than capret's new retrieval head) and shape mismatches — all of them, in one message.
    """
    target = model.state_dict()
    rules = _rules(model)
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    unmatched: list[str] = []
    token_type: Tensor | None = None
    for key, value in state.items():
        if _TOKEN_TYPE.fullmatch(key):
            token_type = value
            continue
        if _DROPPED.fullmatch(key):
            dropped.append(key)
            continue
        name = _rename(key, rules)
        if name is None:
            unmatched.append(key)
        else:
            out[name] = value
    position = "text_encoder.embeddings.position_embeddings.weight"
    if token_type is not None and position in out:
        out[position] = out[position] + token_type[0]  # every token has type 0 in retrieval
    resized = _resize_relative_tables(out, target, model)
    if resized:
        logger.info("resampled %d relative position bias tables to the model's window size", len(resized))
    problems = []
    extra = sorted(k for k in out if k not in target)
    missing = sorted(k for k in target if k not in out and not _NEW.fullmatch(k))
    shapes = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in out.items()
        if k in target and v.shape != target[k].shape
    )
    if unmatched:
        problems.append(f"{len(unmatched)} checkpoint keys have no counterpart: {unmatched}")
    if extra:
        problems.append(
            f"{len(extra)} renamed keys are not in the model (fusion_layer or depth differ?): {extra}"
        )
    if missing:
        problems.append(
            f"{len(missing)} model keys are not in the checkpoint (model.fusion_layer must equal X-VLM's "
            f"text_config.fusion_layer, and depths must match): {missing}"
        )
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {shapes}")
    if problems:
        raise CheckpointError("X-VLM conversion failed; " + "; ".join(problems))
    for key in target:
        if key not in out:
            out[key] = target[key]  # capret's new head keeps its initialisation
    return out, sorted(dropped)


def _geometric_ratio(src_half: int, dst_half: int) -> float:
    """The ratio ``q`` whose geometric series ``1 + q + ... + q^(src_half-1)`` just reaches ``dst_half``.

    BEiT (microsoft/unilm ``beit/run_class_finetuning.py``) and X-VLM (``models/swin_transformer.py``) find it
    by bisection on ``[1.01, 1.5]`` to a width of 1e-6; the same bisection is done here so the grid is theirs to
    the last digit.
    """
    left, right = 1.01, 1.5
    q = (left + right) / 2.0
    while right - left > 1e-6:
        q = (left + right) / 2.0
        series = (1.0 - q**src_half) / (1.0 - q)
        if series > dst_half:
            right = q
        else:
            left = q
    return q


def relative_table_grid(src_size: int, dst_size: int) -> tuple[Any, Any]:
    """Source and destination coordinates of BEiT's / X-VLM's relative-table resampling.

    The source offsets ``-(S//2) .. S//2`` are placed on a geometric-progression grid (spacing 1, q, q², ...
    outward from 0) that spans the destination's integer offsets ``-(D//2) .. D//2``: small offsets, which
    matter most, stay nearly unstretched while the far ones absorb the growth.
    """
    import numpy as np

    q = _geometric_ratio(src_size // 2, dst_size // 2)
    distances, current = [], 1.0
    for i in range(src_size // 2):
        distances.append(current)
        current += q ** (i + 1)
    source = np.array([-d for d in reversed(distances)] + [0.0] + distances)
    half = dst_size // 2.0
    target = np.arange(-half, half + 0.1, 1.0)
    return source, target


def resize_relative_table(table: Tensor, window: tuple[int, int] | int) -> Tensor:
    """Resample a relative position bias table ``[(2W-1)² + extra, heads]`` to window ``W'`` as X-VLM and BEiT do.

    Each head's ``(2W-1) x (2W-1)`` table is fitted with the interpolating bicubic spline (not-a-knot ends, the
    spline scipy's removed ``interp2d(kind="cubic")`` fitted on a regular grid) on the geometric-progression grid
    of :func:`relative_table_grid`, and evaluated at the new integer offsets (clamped to the grid's edge when the
    grid cannot reach them, as FITPACK does). BEiT's ``extra`` rows (the three
    CLS entries: ``rows - floor(sqrt(rows))²``) are kept unchanged at the end. All heads are fitted at once with
    :func:`scipy.interpolate.make_interp_spline` along each axis (a tensor-product interpolating spline is
    separable); ``tests/models/test_xvlm_resize.py`` checks it against a per-head
    :class:`scipy.interpolate.RectBivariateSpline` loop.

    Args:
        table: ``[rows, heads]`` as X-VLM's Swin and X²-VLM's BEiT (and timm's) store it.
        window: the new window ``W'`` (an int, or ``(W', W')``; only square windows exist in these models).

    Raises:
        CheckpointError: a non-square window or a table whose rows are not a square plus a few extra rows.
    """
    import numpy as np
    from scipy.interpolate import make_interp_spline

    wh, ww = (window, window) if isinstance(window, int) else (int(window[0]), int(window[1]))
    if wh != ww:
        raise CheckpointError(f"relative table resampling needs a square window; got {(wh, ww)}")
    rows, heads = table.shape
    src_size = int(rows**0.5)
    extra = rows - src_size * src_size
    if src_size < 1 or src_size % 2 == 0 or extra > 2 * src_size:
        raise CheckpointError(
            f"relative position table of {rows} rows is not (2W-1)² plus a few extra rows (BEiT has 3)"
        )
    dst_size = 2 * wh - 1
    if dst_size == src_size:
        return table.clone()
    grid = table[: src_size * src_size].detach().double().cpu().numpy().reshape(src_size, src_size, heads)
    source, target = relative_table_grid(src_size, dst_size)
    # beyond the source grid (a ratio capped at 1.5 cannot reach far enough) FITPACK, and so interp2d, clamps the
    # coordinate to the grid's edge: nearest-edge extrapolation, not the spline's polynomial continuation
    target = np.clip(target, source[0], source[-1])
    along_rows = make_interp_spline(source, grid, k=3, axis=0)(target)  # [D, S, heads]
    both = make_interp_spline(source, along_rows, k=3, axis=1)(target)  # [D, D, heads]
    out = torch.from_numpy(np.ascontiguousarray(both.reshape(dst_size * dst_size, heads)))
    out = out.to(dtype=table.dtype, device=table.device)
    if extra:
        out = torch.cat([out, table[src_size * src_size :]], dim=0)
    return out


def _resize_relative_tables(out: dict[str, Tensor], target: dict[str, Tensor], model: nn.Module) -> list[str]:
    """Resample relative position bias tables to the model's window (in place); returns the keys resized.

    A checkpoint used at another resolution or window (X-VLM fine-tunes its 224 px Swin at 384 px with window 12;
    a BEiT at a new resolution has a new patch grid) has tables of another size. They are resampled exactly as
    X-VLM and BEiT do when fine-tuning at a new size (:func:`resize_relative_table`: bicubic spline on a
    geometric-progression grid; BEiT's three CLS entries are kept as they are). Only timm towers are resized;
    other mismatches stay errors.
    """
    if _tower_kind(model) is None:
        return []
    suffix = ".relative_position_bias_table"
    resized = []
    for key, value in list(out.items()):
        if not key.endswith(suffix) or key not in target or value.shape == target[key].shape:
            continue
        attention: Any = model.get_submodule(key[: -len(suffix)])
        window = (int(attention.window_size[0]), int(attention.window_size[1]))
        new = resize_relative_table(value, window)
        if new.shape != target[key].shape:
            raise CheckpointError(
                f"{key}: resampled table {tuple(new.shape)} does not fit the model's {tuple(target[key].shape)}"
            )
        out[key] = new
        resized.append(key)
    return resized


def load_xvlm_checkpoint(model: nn.Module, path: str | Path) -> list[str]:
    """Load an X-VLM checkpoint file into a ``blip``-family model in place; returns the dropped keys."""
    state, dropped = convert_xvlm_state_dict(read_checkpoint_tensors(path), model)
    model.load_state_dict(state, strict=True)
    return dropped


#: capret -> X-VLM renames (the inverse of the rules above), for exports and round-trip tests
_VIT_INVERSE: tuple[Rule, ...] = tuple(_name_rule(ours, xvlm) for xvlm, ours in _VIT_NAMES)
_TOWER_INVERSE: tuple[Rule, ...] = (
    (
        r"vision_model\.body\.layers\.(\d+)\.downsample\.(.+)",
        lambda m: f"vision_encoder.layers.{int(m[1]) - 1}.downsample.{m[2]}",
    ),
    (r"vision_model\.body\.(.+)", r"vision_encoder.\1"),
)
_SHARED_INVERSE: tuple[Rule, ...] = (
    (r"text_encoder\.(.+)", r"text_encoder.\1"),
    (r"(vision_proj|text_proj)\.(.+)", r"\1.\2"),
    (r"box_head\.(.+)", r"bbox_head.\1"),
)


def to_xvlm_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The inverse renaming: a ``blip``-family model's weights under X-VLM's names (for exports and tests).

    The token-type embedding is written as zeros (it was folded into the position embeddings) and the retrieval
    head, which X-VLM does not have, is left out.
    """
    rules = (_VIT_INVERSE if _tower_kind(model) is None else _TOWER_INVERSE) + _SHARED_INVERSE
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if _NEW.fullmatch(key):
            continue
        name = _rename(key, rules)
        if name is None:
            raise CheckpointError(f"no X-VLM name for model key {key!r}")
        out[name] = value.clone()
    width = out["text_encoder.embeddings.word_embeddings.weight"].shape[1]
    out["text_encoder.embeddings.token_type_embeddings.weight"] = torch.zeros(2, width)
    return out


@dataclass(frozen=True)
class XvlmPreset:
    """Sizes of a released X-VLM / X²-VLM model (from the ``configs/`` of their repositories)."""

    vision_tower: str  #: timm name of the vision stream
    text_layers: int  #: ``text_num_hidden_layers`` (text + fusion layers)
    fusion_layer: int  #: ``text_fusion_start_at``
    hidden_size: int
    num_heads: int
    intermediate_size: int
    tokenizer: str  #: the BERT vocabulary the checkpoint was trained with
    image_size: int = 224
    embed_dim: int = 256  #: ITC dimension (``embed_dim``)
    vision_tower_args: dict[str, Any] = field(default_factory=dict)  #: extra timm arguments (custom sizes)


#: released checkpoints: X-VLM base (4M / 16M pre-trained, Swin-B at 224 px; its fine-tunes at 384 px, window 12),
#: X²-VLM base and large (BEiT-v2 B/16, L/16)
PRESETS: dict[str, XvlmPreset] = {
    "xvlm-base": XvlmPreset("swin_base_patch4_window7_224", 12, 6, 768, 12, 3072, "bert-base-uncased"),
    "xvlm-base-384": XvlmPreset(  # X-VLM's retrieval / VQA fine-tunes (configs/config_swinB_384.json)
        "swin_base_patch4_window12_384", 12, 6, 768, 12, 3072, "bert-base-uncased", image_size=384
    ),
    "x2vlm-base": XvlmPreset("beit_base_patch16_224", 18, 12, 768, 12, 3072, "bert-base-uncased"),
    "x2vlm-large": XvlmPreset("beit_large_patch16_224", 18, 12, 1024, 16, 4096, "bert-large-uncased"),
}


def write_xvlm_assets(
    out: str | Path, preset: str | XvlmPreset, *, tokenizer: str | None = None
) -> dict[str, Any]:
    """Write the folder that ``model.pretrained`` points at for an X-VLM / X²-VLM checkpoint (no weights).

    It holds a BLIP config describing the text/fusion stack (the vision sizes there are unused: the vision stream
    is ``vision_tower``), the tokenizer (``tokenizer``: a folder or hub id; default the preset's) and an image
    processor (bicubic resize to the preset's resolution, CLIP mean/std as X-VLM's test transform). Returns the
    ``model:`` config entries to use with it (add ``xvlm_checkpoint``).
    """
    from transformers import AutoTokenizer, BlipConfig, BlipImageProcessor

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ConfigError(f"unknown X-VLM preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    out = Path(out)
    source = tokenizer or preset.tokenizer
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise CheckpointError(
            f"tokenizer {source!r} could not be loaded (a local folder or a hub id): {exc}"
        ) from exc
    config = BlipConfig(
        vision_config={"image_size": preset.image_size},
        text_config={
            "vocab_size": len(tok),
            "hidden_size": preset.hidden_size,
            "num_hidden_layers": preset.text_layers,
            "num_attention_heads": preset.num_heads,
            "intermediate_size": preset.intermediate_size,
            "max_position_embeddings": 512,
            "is_decoder": True,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.cls_token_id,
            "sep_token_id": tok.sep_token_id,
        },
        image_text_hidden_size=preset.embed_dim,
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tok.save_pretrained(out)
    BlipImageProcessor(size={"height": preset.image_size, "width": preset.image_size}).save_pretrained(out)
    entries: dict[str, Any] = {
        "family": "blip",
        "pretrained": str(out),
        "pretrained_weights": False,
        "vision_tower": preset.vision_tower,
        "fusion_layer": preset.fusion_layer,
    }
    if preset.vision_tower_args:
        entries["vision_tower_args"] = dict(preset.vision_tower_args)
    return entries
