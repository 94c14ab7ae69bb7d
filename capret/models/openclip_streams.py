"""The two towers of an exported CLIP as dual-stream encoders: ``open_clip_vision`` and ``open_clip_text``.

The dual-stream model (:mod:`capret.models.dual_stream`) is meant to start from a pretrained vision-language
model (X-VLM, BLIP). None can be downloaded here, so its stand-in is the CLIP the package pretrains itself
(``capret-train`` task ``clip``): with ``model.init_from_clip: FOLDER`` both streams become that CLIP's towers,
weights included. Registered in the encoder registry like every other stream, so the towers can also be chosen
one at a time (``visual.kind: open_clip_vision``, ``visual.source: FOLDER``).

* ``open_clip_vision``: open_clip's ViT image tower. Tokens = its patch tokens after the final layer norm
  (``output_tokens``), pooled = the projected CLIP image embedding (so the dual-stream ITC head starts on an
  aligned space). Preprocessing = the folder's: its resolution and CLIP's mean/std, bicubic.
* ``open_clip_text``: the causal text transformer with open_clip's bundled BPE tokenizer. Tokens = the final
  layer-normed hidden states (read with a hook, so the tower runs its own ``encode_text``), pooled = the
  projected embedding at the end-of-text token — exactly ``CLIP.encode_text``.

``source`` is a folder holding ``open_clip_config.json`` (an exported CLIP, or the assets a saved dual-stream
model keeps); ``pretrained: true`` loads the tower's weights from its ``open_clip_model.safetensors``, false
builds the architecture only (a saved dual-stream model's own weights are loaded afterwards).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from capret.errors import ConfigError, MissingFileError
from capret.io import load_safetensors
from capret.models.clip import CLIP_MEAN, CLIP_STD
from capret.models.encoders import (
    EncoderOutput,
    ImageDataConfig,
    TextEncoder,
    VisualEncoder,
    register_encoder,
)
from capret.models.openclip import OPEN_CLIP_CONFIG_FILE

__all__ = ["OpenClipTextEncoder", "OpenClipVisionEncoder", "OPEN_CLIP_STREAMS", "read_open_clip_config"]

_WEIGHTS = "open_clip_model.safetensors"
#: the (image, text) encoder names this module registers on import
OPEN_CLIP_STREAMS = ("open_clip_vision", "open_clip_text")


def read_open_clip_config(source: str | Path) -> dict[str, Any]:
    """The ``open_clip_config.json`` of a folder (``model_cfg`` + ``preprocess_cfg``), named when missing."""
    path = Path(source) / OPEN_CLIP_CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(
            f"an open_clip stream needs a folder with {OPEN_CLIP_CONFIG_FILE} (an exported CLIP: capret-train "
            "task clip)",
            path=path,
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    if "model_cfg" not in data:
        raise ConfigError(f"{path}: no 'model_cfg' (not open_clip's local-dir layout)")
    return dict(data)


def _tower_weights(source: str | Path, prefix: str, *, keep: Any) -> dict[str, Tensor]:
    """The tensors of one tower from the folder's weights: ``prefix`` stripped, ``keep(name)`` selected."""
    path = Path(source) / _WEIGHTS
    if not path.is_file():
        raise MissingFileError(f"pretrained: true needs the CLIP's weights {_WEIGHTS}", path=path)
    state = load_safetensors(path)
    return {k[len(prefix) :]: v for k, v in state.items() if keep(k)}


def _save_config(source: str | Path, directory: Path) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    data = read_open_clip_config(source)
    (directory / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(data, indent=1))
    return {"source": str(directory), "pretrained": False}


@register_encoder(OPEN_CLIP_STREAMS[0])
class OpenClipVisionEncoder(VisualEncoder):
    """The ViT image tower of an exported open_clip model (see the module docstring).

    Args:
        source: folder with ``open_clip_config.json`` (and ``open_clip_model.safetensors`` when pretrained).
        pretrained: load the tower's weights from the folder.
        image_size: must be ``None`` or the tower's own resolution (its position embeddings are fixed).
        freeze: keep the tower's weights fixed.
    """

    def __init__(
        self, *, source: str, pretrained: bool = False, image_size: int | None = None, freeze: bool = False
    ) -> None:
        super().__init__()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        self.source = str(source)
        data = read_open_clip_config(source)
        model_cfg = data["model_cfg"]
        vision = CLIPVisionCfg(**model_cfg["vision_cfg"])
        if isinstance(vision.layers, list | tuple):
            raise ConfigError(
                f"visual.kind=open_clip_vision: {source} has a ResNet image tower; the dual-stream fusion needs "
                "the tokens of a ViT tower (train the CLIP with model.arch.vision.kind=vit)"
            )
        size = int(vision.image_size) if isinstance(vision.image_size, int) else int(vision.image_size[0])
        if image_size is not None and int(image_size) != size:
            raise ConfigError(
                f"visual.image_size={image_size}: the CLIP in {source} takes {size} px (fixed position embeddings)"
            )
        self.model: Any = _build_vision_tower(int(model_cfg["embed_dim"]), vision)
        if pretrained:
            state = _tower_weights(source, "visual.", keep=lambda k: k.startswith("visual."))
            self.model.load_state_dict(state)
        self.model.output_tokens = True
        pre = data.get("preprocess_cfg") or {}
        self.data_config = ImageDataConfig(
            image_size=size,
            mean=tuple(float(v) for v in pre.get("mean", CLIP_MEAN)),  # type: ignore[arg-type]
            std=tuple(float(v) for v in pre.get("std", CLIP_STD)),  # type: ignore[arg-type]
            interpolation=str(pre.get("interpolation", "bicubic")),
        )
        self.token_width = int(vision.width)
        self.pooled_width = int(model_cfg["embed_dim"])
        if freeze:
            self.model.requires_grad_(False)

    def forward(self, pixels: Tensor) -> EncoderOutput:
        pooled, tokens = self.model(pixels)
        return EncoderOutput(tokens=tokens, pooled=pooled)

    def save_assets(self, directory: Path) -> dict[str, Any]:
        return _save_config(self.source, directory)


class _TextTower(nn.Module):
    """The text half of an open_clip ``CLIP`` (its attribute names, so the exported state dict loads as is)."""

    def __init__(self, model_cfg: dict[str, Any]) -> None:
        super().__init__()
        from open_clip.model import CLIPTextCfg, _build_text_tower

        text_cfg = CLIPTextCfg(**model_cfg["text_cfg"])
        tower = _build_text_tower(int(model_cfg["embed_dim"]), text_cfg)
        self.context_length = int(text_cfg.context_length)
        self.transformer = tower.transformer
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.attn_mask: Tensor
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(hidden states ``[B, L, width]`` after the final layer norm, projected end-of-text embedding)."""
        length = input_ids.shape[1]
        cast = self.transformer.get_cast_dtype()
        x = self.token_embedding(input_ids).to(cast) + self.positional_embedding[:length].to(cast)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        hidden = self.ln_final(x)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), input_ids.argmax(dim=-1)]
        return hidden, pooled @ self.text_projection


@register_encoder(OPEN_CLIP_STREAMS[1])
class OpenClipTextEncoder(TextEncoder):
    """The text tower of an exported open_clip model with its BPE tokenizer (see the module docstring).

    Args:
        source: folder with ``open_clip_config.json`` (and ``open_clip_model.safetensors`` when pretrained).
        pretrained: load the tower's weights from the folder.
        max_length: captions are cut at ``min(max_length, the tower's context)`` tokens.
        freeze: keep the tower's weights fixed (it then runs without autograd).
    """

    def __init__(
        self, *, source: str, pretrained: bool = False, max_length: int = 77, freeze: bool = False
    ) -> None:
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer

        self.source = str(source)
        model_cfg = read_open_clip_config(source)["model_cfg"]
        self.model = _TextTower(model_cfg)
        if pretrained:
            names = set(self.model.state_dict())
            state = _tower_weights(source, "", keep=lambda k: k in names)
            self.model.load_state_dict(state)
        self.max_length = min(int(max_length), self.model.context_length)
        self.tokenizer = SimpleTokenizer(context_length=self.max_length)
        self.frozen = freeze
        self.token_width = int(model_cfg["text_cfg"]["width"])
        self.pooled_width = int(model_cfg["embed_dim"])
        if freeze:
            self.model.requires_grad_(False)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """open_clip's BPE ids padded with 0 to ``max_length`` (end-of-text kept when cut), and their mask."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of captions, got a single string")
        ids = self.tokenizer(list(texts), context_length=self.max_length)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> EncoderOutput:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden, pooled = self.model(input_ids)
        return EncoderOutput(tokens=hidden, pooled=pooled, mask=attention_mask.bool())

    def save_assets(self, directory: Path) -> dict[str, Any]:
        return _save_config(self.source, directory)
