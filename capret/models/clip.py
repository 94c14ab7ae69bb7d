"""Hugging Face CLIP behind one small wrapper.

:func:`load_clip` returns a :class:`ClipBundle`: the ``CLIPModel`` *with* its tokenizer and its image
preprocessing (target-pad or square-pad followed by CLIP's resize/crop/normalisation, as in CLIP4Cir,
Baldrati et al. 2022, Sec. 3.3), so no caller rebuilds normalisation. Any CLIP size works because the
architecture is read from the checkpoint's ``config.json``; a hub id or a local folder is accepted.

Tests and benchmarks use :func:`capret.testing.save_random_clip` (random weights, a tokenizer trained on the
fly, saved in the ``from_pretrained`` layout), so the exact same :func:`load_clip` path loads it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClipBundle",
    "load_clip",
]

PadMode = Literal["targetpad", "squarepad", "none"]

#: CLIP's own normalisation statistics (openai/CLIP ``_transform``), used when a folder has no image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipBundle(nn.Module):
    """A ``CLIPModel`` with its tokenizer and image preprocessing.

    ``image_features``/``text_features`` return the *raw* projected embeddings, which is what the CLIP4Cir
    Combiner and its element-wise sum consume (normalisation happens after fusion); ``encode_image`` and
    ``encode_text`` return L2-normalised embeddings as the package's encoder contract requires.
    """

    model: Any  # transformers.CLIPModel (typed loosely: its submodules are read as attributes)

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer: Any,
        transform: Callable[[Any], torch.Tensor],
        name: str,
        preprocess_id: str,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform
        self.name = name
        #: a string that identifies the preprocessing, part of every feature-cache key
        self.preprocess_id = preprocess_id

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded to the longest text and cut at the context length."""
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) image embeddings ``[B, d]`` of preprocessed pixels ``[B, 3, H, W]``."""
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) text embeddings ``[B, d]`` pooled at the end-of-text token."""
        pooled = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.model.text_projection(pooled)

    def forward(
        self,
        *,
        pixels: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Raw features of whatever is given: ``{"image": [B, d]}`` and/or ``{"text": [B, d]}``.

        Training goes through ``forward`` (one call per step) so that DistributedDataParallel can
        synchronise the gradients of both towers.
        """
        out: dict[str, torch.Tensor] = {}
        if pixels is not None:
            out["image"] = self.image_features(pixels)
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            out["text"] = self.text_features(input_ids, attention_mask)
        return out

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(pixels), dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        return F.normalize(self.text_features(**tokens), dim=-1)

    def image_fingerprint(self) -> str:
        """Hash of the weights image features depend on (vision tower + projection), for cache keys."""
        return weights_fingerprint(nn.ModuleList([self.model.vision_model, self.model.visual_projection]))

    def text_fingerprint(self) -> str:
        """Hash of the weights text features depend on (text tower + projection), for cache keys.

        Keying each modality by its own tower means fine-tuning only the text encoder (CLIP4Cir stage 1)
        keeps every cached image feature valid.
        """
        return weights_fingerprint(nn.ModuleList([self.model.text_model, self.model.text_projection]))

    def set_trainable(self, *, text: bool, image: bool) -> None:
        """Freeze or unfreeze the two towers (CLIP4Cir stage 1 fine-tunes the text tower, optionally both)."""
        self.model.requires_grad_(False)
        if text:
            for module in (self.model.text_model, self.model.text_projection):
                module.requires_grad_(True)
        if image:
            for module in (self.model.vision_model, self.model.visual_projection):
                module.requires_grad_(True)


def weights_fingerprint(module: nn.Module) -> str:
    """A short hash of every parameter and buffer, used to key feature caches by the exact weights.

    Hashing the bytes makes a cache built from a fine-tuned stage-1 model distinct from one built from the
    pretrained weights even though both carry the same name.
    """
    digest = hashlib.blake2b(digest_size=16)
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _processor_stats(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return CLIP_MEAN, CLIP_STD
    data = json.loads(file.read_text())
    return tuple(data.get("image_mean", CLIP_MEAN)), tuple(data.get("image_std", CLIP_STD))


def load_clip(
    name_or_path: str | Path,
    *,
    preprocess: PadMode = "targetpad",
    target_ratio: float = 1.25,
    device: str | torch.device = "cpu",
) -> ClipBundle:
    """Load a CLIP checkpoint (hub id or local folder) with its tokenizer and CIR preprocessing.

    Args:
        name_or_path: e.g. ``openai/clip-vit-base-patch32`` or a folder written by ``save_pretrained``.
        preprocess: ``targetpad`` (CLIP4Cir's default: pad only images whose aspect ratio exceeds
            ``target_ratio``), ``squarepad`` (always pad to a square) or ``none`` (plain CLIP resize/crop).
        target_ratio: the aspect-ratio threshold of target padding (1.25 in CLIP4Cir).
        device: where the model is placed.
    """
    from transformers import AutoTokenizer, CLIPModel

    from capret.data.transforms import clip_transform

    if preprocess not in ("targetpad", "squarepad", "none"):
        raise ValueError(f"preprocess={preprocess!r}; valid: targetpad, squarepad, none")
    model: Any = CLIPModel.from_pretrained(str(name_or_path))
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    size = int(model.config.vision_config.image_size)
    local = Path(name_or_path)
    mean, std = _processor_stats(local) if local.is_dir() else (CLIP_MEAN, CLIP_STD)
    pad = None if preprocess == "none" else preprocess
    transform = clip_transform(size, pad=pad, target_ratio=target_ratio, mean=mean, std=std)
    preprocess_id = f"{preprocess}:{target_ratio}:{size}:{mean}:{std}"
    return ClipBundle(
        model,
        tokenizer=tokenizer,
        transform=transform,
        name=str(name_or_path),
        preprocess_id=preprocess_id,
    )
