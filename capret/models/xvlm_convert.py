"""Load released X-VLM / X²-VLM checkpoints into the ``blip`` dual-stream family (tensors only, no pickle).

X-VLM (Zeng et al., ICML 2022; code: zengyan-97/X-VLM, ``models/xvlm.py``) stores one state dict (under
``"model"`` in its ``.pth`` files) with these parts, which map one to one onto
:class:`~capret.models.blip_stream.BlipDualStreamModel` built with ``fusion_layer = k`` (X-VLM's
``text_config.fusion_layer``, 6 for the base models):

========================================================  ====================================================
X-VLM                                                      capret (family ``blip``)
========================================================  ====================================================
``vision_encoder.cls_token`` / ``pos_embed``               ``vision_model.embeddings.class_embedding`` / ``position_embedding``
``vision_encoder.patch_embed.proj.*``                      ``vision_model.embeddings.patch_embedding.*``
``vision_encoder.blocks.i.{norm1,attn.qkv,attn.proj,...}`` ``vision_model.encoder.layers.i.{layer_norm1,self_attn.qkv,self_attn.projection,...}``
``vision_encoder.norm.*``                                  ``vision_model.post_layernorm.*``
``text_encoder[.bert].embeddings/encoder.layer.i.*``       ``text_encoder.embeddings/encoder.layer.i.*`` (cross-attention from layer k)
``text_encoder.embeddings.token_type_embeddings``          folded into ``position_embeddings`` (type 0 is added to every token)
``vision_proj`` / ``text_proj`` / ``bbox_head``            ``vision_proj`` / ``text_proj`` / ``box_head``
``itm_head``, ``temp``, MLM head ``text_encoder.cls.*``    not used by retrieval: dropped and reported
========================================================  ====================================================

The retrieval head (``head``) is capret's own and starts fresh. The DeiT-style ViT of X-VLM matches BLIP's ViT
(fused ``qkv``, GELU, post-norm); set the BLIP config's ``vision_config.layer_norm_eps`` to 1e-6 as in X-VLM.
Checkpoints whose vision encoder is a Swin transformer or a CLIP ViT (separate q/k/v, a pre-norm), or X²-VLM's
BEiT ViT (layer scales), have no counterpart here: :func:`convert_xvlm_state_dict` then raises a
:class:`~capret.errors.CheckpointError` that lists every unmatched key rather than loading a partial model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from capret.errors import CheckpointError

__all__ = ["convert_xvlm_state_dict", "load_xvlm_checkpoint", "read_checkpoint_tensors", "to_xvlm_state_dict"]

#: (X-VLM regex, capret template) for one-to-one renames; applied in order, first match wins
_RULES: tuple[tuple[str, str], ...] = (
    (r"vision_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"vision_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
    (r"vision_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
    (r"vision_encoder\.blocks\.(\d+)\.norm1\.(.+)", r"vision_model.encoder.layers.\1.layer_norm1.\2"),
    (r"vision_encoder\.blocks\.(\d+)\.norm2\.(.+)", r"vision_model.encoder.layers.\1.layer_norm2.\2"),
    (r"vision_encoder\.blocks\.(\d+)\.attn\.qkv\.(.+)", r"vision_model.encoder.layers.\1.self_attn.qkv.\2"),
    (
        r"vision_encoder\.blocks\.(\d+)\.attn\.proj\.(.+)",
        r"vision_model.encoder.layers.\1.self_attn.projection.\2",
    ),
    (r"vision_encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.(.+)", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"vision_encoder\.norm\.(.+)", r"vision_model.post_layernorm.\1"),
    (
        r"text_encoder\.(?:bert\.)?(embeddings\.(?:word_embeddings|position_embeddings|LayerNorm)\..+)",
        r"text_encoder.\1",
    ),
    (r"text_encoder\.(?:bert\.)?(encoder\.layer\.\d+\..+)", r"text_encoder.\1"),
    (r"(vision_proj|text_proj)\.(weight|bias)", r"\1.\2"),
    (r"bbox_head\.(\d+)\.(weight|bias)", r"box_head.\1.\2"),
)
#: checkpoint keys that retrieval does not use (reported, never an error)
_DROPPED = re.compile(
    r"(itm_head\..*|temp|text_encoder\.cls\..*|.*position_ids|text_encoder\.(?:bert\.)?pooler\..*|idx_queue|"
    r"image_queue|text_queue|.*_m\..*|.*_m)"
)
_TOKEN_TYPE = re.compile(r"text_encoder\.(?:bert\.)?embeddings\.token_type_embeddings\.weight")
#: target keys that capret adds and that start fresh
_NEW = re.compile(r"head\.(weight|bias)")


def read_checkpoint_tensors(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file: safetensors, or a torch file read with ``weights_only=True`` (no pickle
    code runs). A ``{"model": state_dict}`` wrapper, as X-VLM saves, is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"X-VLM checkpoint {path} does not exist", path=path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code objects, or not a torch file
        raise CheckpointError(f"{path}: not loadable with weights_only=True ({exc})", path=path) from exc
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(
            f"{path}: expected a state dict of tensors (optionally under 'model')", path=path
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
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    unmatched: list[str] = []
    token_type: Tensor | None = None
    for key, value in state.items():
        if _TOKEN_TYPE.fullmatch(key):
            token_type = value
            continue
        for pattern, template in _RULES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, template, key)] = value
                break
        else:
            (dropped if _DROPPED.fullmatch(key) else unmatched).append(key)
    position = "text_encoder.embeddings.position_embeddings.weight"
    if token_type is not None and position in out:
        out[position] = out[position] + token_type[0]  # every token has type 0 in retrieval
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


def load_xvlm_checkpoint(model: nn.Module, path: str | Path) -> list[str]:
    """Load an X-VLM checkpoint file into a ``blip``-family model in place; returns the dropped keys."""
    state, dropped = convert_xvlm_state_dict(read_checkpoint_tensors(path), model)
    model.load_state_dict(state, strict=True)
    return dropped


#: capret -> X-VLM renames (the inverse of ``_RULES``), for exports and round-trip tests
_INVERSE: tuple[tuple[str, str], ...] = (
    (r"vision_model\.embeddings\.class_embedding", "vision_encoder.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "vision_encoder.pos_embed"),
    (r"vision_model\.embeddings\.patch_embedding\.(.+)", r"vision_encoder.patch_embed.proj.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.(.+)", r"vision_encoder.blocks.\1.norm\2.\3"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.(.+)", r"vision_encoder.blocks.\1.attn.qkv.\2"),
    (
        r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.(.+)",
        r"vision_encoder.blocks.\1.attn.proj.\2",
    ),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(.+)", r"vision_encoder.blocks.\1.mlp.\2"),
    (r"vision_model\.post_layernorm\.(.+)", r"vision_encoder.norm.\1"),
    (r"text_encoder\.(.+)", r"text_encoder.\1"),
    (r"(vision_proj|text_proj)\.(.+)", r"\1.\2"),
    (r"box_head\.(.+)", r"bbox_head.\1"),
)


def to_xvlm_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The inverse renaming: a ``blip``-family model's weights under X-VLM's names (for exports and tests).

    The token-type embedding is written as zeros (it was folded into the position embeddings) and the retrieval
    head, which X-VLM does not have, is left out.
    """
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if _NEW.fullmatch(key):
            continue
        for pattern, template in _INVERSE:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, template, key)] = value.clone()
                break
        else:
            raise CheckpointError(f"no X-VLM name for model key {key!r}")
    width = out["text_encoder.embeddings.word_embeddings.weight"].shape[1]
    out["text_encoder.embeddings.token_type_embeddings.weight"] = torch.zeros(2, width)
    return out
