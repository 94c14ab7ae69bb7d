"""Dual-stream family ``blip``: a pretrained Hugging Face BLIP retrieval model as visual stream + fusion stream.

``BlipForImageTextRetrieval`` (Li et al., 2022) is the ALBEF/X-VLM family that transformers ships: a ViT, and a
BERT text encoder whose layers cross-attend to the image patches — that text encoder *is* the fusion stream, so
nothing in the fusion starts from random weights. ``vision_proj``/``text_proj`` give the ITC embeddings. On top
of it capret adds only what retrieval needs: the retrieval head over ``[fused CLS, image CLS]`` and X-VLM's box
head (an MLP on the fused CLS, sigmoid ``cx, cy, w, h``).

Two schedules of the text layers (``model.fusion_layer``):

* ``null`` — BLIP's: the caption-only pass (ITC) runs every layer without cross-attention; the fused pass runs
  every layer with it.
* ``k`` — X-VLM's: layers ``[0, k)`` encode the caption alone (their output is the ITC text feature), layers
  ``[k, L)`` fuse it with the image. Layers below ``k`` then have no cross-attention weights, exactly like an
  X-VLM checkpoint (``capret.models.xvlm_convert`` loads those).

``model.vision_tower`` swaps BLIP's ViT for X-VLM's Swin or X²-VLM's BEiT-v2 (timm backbones with X-VLM's
token layout, :mod:`capret.models.vision_towers`); the text encoder's cross-attention then reads that width.

A sample without a caption takes the empty caption (``[CLS] [SEP]``) through the fusion, so the same model serves
image-only queries. Selected by ``model.family: blip`` + ``model.pretrained: <hub id or folder>`` in a dual-stream
config; the model satisfies the :class:`~capret.models.dual_stream.DualStreamModel` contract (it subclasses it).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capret.errors import ConfigError
from capret.io import check_weights_folder
from capret.models.dual_stream import (
    CaptionInputs,
    DualStreamFeatures,
    DualStreamModel,
    DualStreamModelConfig,
    register_family,
)
from capret.models.encoders import ImageDataConfig

__all__ = ["BlipDualStreamModel", "box_mlp"]

_ASSETS = "blip"


def box_mlp(width: int, out: int = 4) -> nn.Sequential:
    """X-VLM's head MLP: Linear(w, 2w), LayerNorm, GELU, Linear(2w, out) (same layout as its ``bbox_head``)."""
    return nn.Sequential(
        nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, out)
    )


class BlipDualStreamModel(DualStreamModel):
    """See the module docstring. ``config.pretrained`` is the BLIP checkpoint (hub id or local folder)."""

    def __init__(self, config: DualStreamModelConfig) -> None:
        nn.Module.__init__(self)
        from transformers import AutoTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor

        if not config.pretrained:
            raise ConfigError("model.family blip needs model.pretrained: a BLIP hub id or local folder")
        source = str(config.pretrained)
        tower = None
        if config.pretrained_weights:
            if config.vision_tower:
                raise ConfigError(
                    "model.vision_tower replaces BLIP's ViT, so BLIP's weights do not fit: set "
                    "model.pretrained_weights: false and load weights with model.xvlm_checkpoint"
                )
            check_weights_folder(source)  # a local folder of pickles or a truncated file: refused, named
            blip: Any = BlipForImageTextRetrieval.from_pretrained(source)
        else:
            blip_config: Any = BlipConfig.from_pretrained(source)
            blip_config.text_config.is_decoder = True  # builds the cross-attention of every text layer
            build_config = blip_config
            if config.vision_tower:
                from capret.models.vision_towers import TimmVisionTower

                tower = TimmVisionTower(
                    config.vision_tower,
                    image_size=int(blip_config.vision_config.image_size),
                    **config.vision_tower_args,
                )
                blip_config.text_config.encoder_hidden_size = tower.width  # cross-attention reads the tower
                build_config = copy.deepcopy(blip_config)
                build_config.vision_config.num_hidden_layers = 0  # BLIP's ViT is replaced: do not build it
            blip = BlipForImageTextRetrieval(build_config)
            blip.config = blip_config
        self.blip_config = blip.config
        self.vision_model = blip.vision_model if tower is None else tower
        self.text_encoder = blip.text_encoder
        self.text_proj = blip.text_proj
        itc_dim = int(self.blip_config.image_text_hidden_size)
        self.vision_proj = blip.vision_proj if tower is None else nn.Linear(tower.width, itc_dim)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.processor = BlipImageProcessor.from_pretrained(source)
        layers = self.text_encoder.encoder.layer
        k = config.fusion_layer
        if k is not None:
            if not 0 <= k < len(layers):
                raise ConfigError(f"model.fusion_layer {k} is outside [0, {len(layers)}) text layers")
            for layer in list(layers)[:k]:  # X-VLM: text-only layers have no cross-attention
                if hasattr(layer, "crossattention"):
                    del layer.crossattention
        text_width = int(self.blip_config.text_config.hidden_size)
        vision_width = int(self.blip_config.vision_config.hidden_size) if tower is None else tower.width
        self.config = replace(config, itc_dim=itc_dim, width=text_width)
        self.head = nn.Linear(text_width + vision_width, config.embed_dim)
        self.box_head = box_mlp(text_width)
        size = int(self.blip_config.vision_config.image_size)
        self.blip_data_config = ImageDataConfig(
            image_size=size,
            mean=tuple(float(v) for v in self.processor.image_mean),  # type: ignore[arg-type]
            std=tuple(float(v) for v in self.processor.image_std),  # type: ignore[arg-type]
        )
        if config.xvlm_checkpoint:
            from capret.models.xvlm_convert import load_xvlm_checkpoint

            load_xvlm_checkpoint(self, config.xvlm_checkpoint)
        if config.visual.freeze:
            for p in self.vision_model.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def data_config(self) -> Any:
        return self.blip_data_config

    def tokenize(self, captions: list[str]) -> dict[str, Tensor]:
        if isinstance(captions, str):
            raise TypeError("tokenize expects a list of captions, got a single string")
        enc = self.tokenizer(
            list(captions),
            padding=True,
            truncation=True,
            max_length=self.config.text.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    # --------------------------------------------------------------------------------------------- forward
    def _run_layers(
        self, hidden: Tensor, mask: Tensor, layers: list[nn.Module], image: Tensor | None
    ) -> Tensor:
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in layers:
            hidden = layer(hidden, image, attention_mask=additive, encoder_attention_mask=None)
        return hidden

    def _empty_captions(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        tokens = self.tokenize([""] * batch)
        return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)

    def fuse(self, pixels: Tensor, captions: CaptionInputs | None) -> DualStreamFeatures:
        """BLIP's / X-VLM's text encoder with cross-attention to the image; a caption-less row reads the empty
        caption ``[CLS] [SEP]``."""
        batch = pixels.shape[0]
        image = self.vision_model(pixel_values=pixels).last_hidden_state
        text_itc = None
        with_text = captions is not None
        if captions is None:
            input_ids, attention_mask = self._empty_captions(batch, pixels.device)
        else:
            input_ids, attention_mask = captions.input_ids, captions.attention_mask
            if captions.dropped is not None:
                off = captions.dropped
                if bool(off.any()):  # a dropped caption becomes the empty caption [CLS] [SEP]
                    empty_ids, empty_mask = self._empty_captions(batch, input_ids.device)
                    width = max(input_ids.shape[1], empty_ids.shape[1])
                    input_ids, attention_mask = _pad(input_ids, width), _pad(attention_mask, width)
                    empty_ids, empty_mask = _pad(empty_ids, width), _pad(empty_mask, width)
                    input_ids = torch.where(off[:, None], empty_ids, input_ids)
                    attention_mask = torch.where(off[:, None], empty_mask, attention_mask)
        embeddings = self.text_encoder.embeddings(input_ids=input_ids)
        layers = list(self.text_encoder.encoder.layer)
        k = self.config.fusion_layer
        if k is None:  # BLIP: caption-only pass and fused pass each run every layer
            fused = self._run_layers(embeddings, attention_mask, layers, image)
            if with_text:
                text = self._run_layers(embeddings, attention_mask, layers, None)
                text_itc = self.text_proj(text[:, 0])
        else:  # X-VLM: the caption layers feed the fusion layers
            text = self._run_layers(embeddings, attention_mask, layers[:k], None)
            fused = self._run_layers(text, attention_mask, layers[k:], image)
            if with_text:
                text_itc = self.text_proj(text[:, 0])
        return DualStreamFeatures(
            fused_cls=fused[:, 0],
            visual_pooled=image[:, 0],
            image_itc=self.vision_proj(image[:, 0]),
            text_itc=text_itc,
        )

    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor:
        """Caption-only ITC embedding (``text_proj`` of the caption pass's [CLS])."""
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        layers = list(self.text_encoder.encoder.layer)
        k = self.config.fusion_layer
        text = self._run_layers(
            self.text_encoder.embeddings(input_ids=ids), mask, layers[:k] if k else layers, None
        )
        return F.normalize(self.text_proj(text[:, 0]), dim=-1)

    # ---------------------------------------------------------------------------------------- save / load
    def portable_config(self, directory: Path) -> DualStreamModelConfig:
        """Write the BLIP config, tokenizer and image processor under ``directory/blip`` (never weights)."""
        assets = directory / _ASSETS
        assets.mkdir(parents=True, exist_ok=True)
        self.blip_config.save_pretrained(assets)
        self.tokenizer.save_pretrained(assets)
        self.processor.save_pretrained(assets)
        return replace(self.config, pretrained=_ASSETS, pretrained_weights=False, xvlm_checkpoint=None)


def _pad(t: Tensor, width: int) -> Tensor:
    return F.pad(t, (0, width - t.shape[1])) if t.shape[1] < width else t


register_family("blip", BlipDualStreamModel)
