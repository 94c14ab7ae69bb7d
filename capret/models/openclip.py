"""open_clip backbones behind :class:`capret.models.clip_base.ClipBundle`.

The composed-retrieval papers publish numbers with open_clip/OpenAI-CLIP weights that have no Hugging Face
``CLIPModel`` twin: CLIP4Cir's RN50x4 (a ModifiedResNet image tower), and CIReVL's ViT-bigG-14 (LAION-2B).
:func:`load_open_clip` builds them with open_clip's own factory (``create_model_and_transforms(name,
pretrained=tag)``), keeps the model's *own* evaluation preprocessing (its resolution, interpolation, mean/std)
and puts CLIP4Cir's target padding in front of it.

Both open_clip model classes are supported: ``CLIP`` (text tower attributes on the model) and
``CustomTextCLIP`` with open_clip's ``TextTransformer`` (``model.text``); text towers built from a Hugging Face
transformer (``hf_model_name`` configs) have no token-embedding table of their own and are refused for
pseudo-word methods with a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import transforms as T

from capret.errors import ConfigError
from capret.models.clip_base import ClipBundle

__all__ = ["OPEN_CLIP_CONFIG_FILE", "OpenClipBundle", "load_open_clip", "wrap_open_clip"]

#: the architecture file of open_clip's ``local-dir:`` layout
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"

#: state-dict entries of an open_clip model that belong to neither tower (the contrastive temperature/bias)
_SHARED = ("logit_scale", "logit_bias")


class OpenClipBundle(ClipBundle):
    """An open_clip ``CLIP``/``CustomTextCLIP`` behind the :class:`ClipBundle` interface.

    The open_clip tokenizer pads every text to the full context length with id 0 and the model pools at the
    end-of-text token itself, so the attention mask is informational (``ids != 0``) and not passed on.
    """

    @property
    def _text_tower(self) -> Any:
        """The module holding ``token_embedding`` (the model itself for ``CLIP``, ``model.text`` otherwise)."""
        text = getattr(self.model, "text", None)
        return text if text is not None else self.model

    @property
    def feature_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def token_embedding(self) -> nn.Embedding:
        table = getattr(self._text_tower, "token_embedding", None)
        if not isinstance(table, nn.Embedding):
            raise TypeError(
                f"open_clip model {self.name} has a Hugging Face text tower without its own token-embedding "
                "table; pseudo-word methods need an open_clip TextTransformer text tower"
            )
        return table

    @property
    def tokenizer_id(self) -> str:
        vocab = getattr(self.tokenizer, "vocab_size", None) or len(getattr(self.tokenizer, "encoder", {}))
        return f"open_clip:{type(self.tokenizer).__name__}:{vocab}:{self.context_length}"

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(list(texts), context_length=self.context_length)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def plain_token_ids(self, text: str) -> list[int]:
        if hasattr(self.tokenizer, "encode"):  # open_clip's SimpleTokenizer (the OpenAI BPE)
            return [int(i) for i in self.tokenizer.encode(text)]
        inner = self.tokenizer.tokenizer  # open_clip's HFTokenizer wraps a transformers tokenizer
        return [int(i) for i in inner(text, add_special_tokens=False)["input_ids"]]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        del attention_mask  # open_clip pools at the end-of-text token and masks causally by itself
        return self.model.encode_text(input_ids)

    def is_image_parameter(self, name: str) -> bool:
        return name.startswith("visual.")

    def is_text_parameter(self, name: str) -> bool:
        return not name.startswith("visual.") and name not in _SHARED


def load_open_clip(
    name: str,
    *,
    pretrained: str | None,
    preprocess: str = "targetpad",
    target_ratio: float = 1.25,
    device: str | torch.device = "cpu",
) -> OpenClipBundle:
    """Build an open_clip model with its tokenizer and (padded) evaluation preprocessing.

    Args:
        name: open_clip architecture, e.g. ``RN50x4``, ``ViT-L-14``, ``ViT-bigG-14`` (``open_clip.list_models()``),
            or a schema name: ``local-dir:/path`` (``open_clip_config.json`` + weights) or ``hf-hub:org/repo``.
            A plain path to a folder holding ``open_clip_config.json`` (what ``capret-train`` task ``clip``
            exports) is read as ``local-dir:``.
        pretrained: a pretrained tag (``openai``, ``laion2b_s39b_b160k``; ``open_clip.list_pretrained()``) or a
            local weights file; None builds random weights (tests, or weights loaded afterwards).
        preprocess: ``targetpad``, ``squarepad`` or ``none``, placed before the model's own transform.
        target_ratio: aspect-ratio threshold of target padding.
        device: where the model is placed.
    """
    import open_clip

    if ":" not in name and (Path(name) / OPEN_CLIP_CONFIG_FILE).is_file():
        name = f"local-dir:{name}"
    if ":" not in name and name not in open_clip.list_models():
        raise ConfigError(
            f"open_clip architecture {name!r} is unknown; e.g. RN50x4, ViT-L-14, ViT-bigG-14 "
            f"({len(open_clip.list_models())} known: open_clip.list_models()), or a folder with "
            f"{OPEN_CLIP_CONFIG_FILE}"
        )
    model, _, own_transform = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device
    )
    return wrap_open_clip(
        model.eval(),
        tokenizer=open_clip.get_tokenizer(name),
        own_transform=own_transform,
        name=f"{name}:{pretrained}" if pretrained else name,
        preprocess=preprocess,
        target_ratio=target_ratio,
    )


def wrap_open_clip(
    model: nn.Module,
    *,
    tokenizer: Any,
    own_transform: Any,
    name: str,
    preprocess: str = "targetpad",
    target_ratio: float = 1.25,
) -> OpenClipBundle:
    """An open_clip model already in memory (one being trained) behind :class:`OpenClipBundle`, with the same
    padding + own-transform preprocessing :func:`load_open_clip` gives a loaded one, so training and every later
    use of the exported folder see identically preprocessed pixels."""
    from capret.data.transforms import SquarePad, TargetPad

    steps: list[Any] = [_RGB()]
    if preprocess == "targetpad":
        steps.append(TargetPad(target_ratio))
    elif preprocess == "squarepad":
        steps.append(SquarePad())
    elif preprocess != "none":
        raise ConfigError(f"preprocess={preprocess!r}; valid: targetpad, squarepad, none")
    transform = T.Compose([*steps, own_transform])
    preprocess_id = f"open_clip:{preprocess}:{target_ratio}:{' '.join(repr(own_transform).split())}"
    return OpenClipBundle(
        model, tokenizer=tokenizer, transform=transform, name=name, preprocess_id=preprocess_id
    )


class _RGB:
    """Convert to RGB before padding (padding a palette or greyscale image with black must stay RGB)."""

    def __call__(self, image: Any) -> Any:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return "RGB()"
