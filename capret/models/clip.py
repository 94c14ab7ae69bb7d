"""CLIP backbones behind one interface: Hugging Face ``CLIPModel`` and open_clip.

:func:`load_clip` returns a :class:`ClipBundle` (see :mod:`capret.models.clip_base`): the model *with* its
tokenizer and its image preprocessing (target-pad or square-pad followed by the model's own resize/crop/
normalisation, as in CLIP4Cir, Baldrati et al. 2022, Sec. 3.3), so no caller rebuilds normalisation.

* ``backend="hf"``: any Hugging Face CLIP (a hub id or a local ``save_pretrained`` folder); the architecture is
  read from its ``config.json``.
* ``backend="open_clip"``: ``open_clip.create_model_and_transforms(name, pretrained=tag)`` — the papers'
  backbones (``RN50x4``/``openai`` for CLIP4Cir, ``ViT-L-14``/``openai`` for SEARLE/Pic2Word/LinCIR,
  ``ViT-bigG-14``/``laion2b_s39b_b160k`` for CIReVL); ``pretrained`` may also be a local weights file.

Configs name a backbone with a :class:`ClipConfig` section (``clip: {backend, name, pretrained}``); the training
tasks' ``model.clip`` sections are a :class:`TaskClipConfig` (the same plus ``preprocess``/``target_ratio``).
Tests use :func:`capret.testing.save_random_clip` (HF layout) and :func:`capret.testing.register_tiny_open_clip`
(a tiny open_clip architecture), so the exact same loading paths run offline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from capret.config import cfg
from capret.errors import ConfigError
from capret.io import check_weights_folder
from capret.models.clip_base import ClipBundle, PseudoTokenError, weights_fingerprint

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClipBundle",
    "ClipConfig",
    "FLAT_CLIP_FEATURE_KEYS",
    "HFClipBundle",
    "PseudoTokenError",
    "TaskClipConfig",
    "load_clip",
    "load_clip_config",
    "load_task_clip_config",
    "weights_fingerprint",
]

PadMode = Literal["targetpad", "squarepad", "none"]
Backend = Literal["hf", "open_clip"]

#: CLIP's own normalisation statistics (openai/CLIP ``_transform``), used when a folder has no image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipConfig:
    """Which CLIP to load (a ``clip:`` section of a task config)."""

    backend: Backend = cfg("hf", "model library: hf (transformers CLIPModel) | open_clip")
    name: str = cfg(
        "openai/clip-vit-base-patch32",
        "hf: hub id or local from_pretrained folder; open_clip: architecture (RN50x4, ViT-L-14, ViT-bigG-14)",
    )
    pretrained: str | None = cfg(
        None, "open_clip: pretrained tag (openai, laion2b_s39b_b160k) or a local weights file; hf: unused"
    )


@dataclass
class TaskClipConfig(ClipConfig):
    """A training task's ``model.clip`` section: which CLIP (``backend``, ``name``, ``pretrained``) and the image
    preprocessing in front of it. The preprocessing belongs to the model because features computed with another
    padding are different features (the feature caches key on it)."""

    preprocess: PadMode = cfg(
        "targetpad", "image padding before the CLIP transform: targetpad | squarepad | none"
    )
    target_ratio: float = cfg(1.25, "aspect-ratio threshold of targetpad")


#: keys every flat config of the first CLIP-feature checkpoints (Combiner and zero-shot mappers) carried, and
#: where they live in today's sections; each task's own table adds its other keys
FLAT_CLIP_FEATURE_KEYS: dict[str, tuple[str, ...]] = {
    "feature_cache": ("data", "feature_cache"),
    "eval_batch_size": ("data", "encode_batch_size"),
    "preprocess": ("model", "clip", "preprocess"),
    "target_ratio": ("model", "clip", "target_ratio"),
}


class HFClipBundle(ClipBundle):
    """A Hugging Face ``CLIPModel`` behind the :class:`ClipBundle` interface."""

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.text_model.embeddings.token_embedding

    @property
    def tokenizer_id(self) -> str:
        return f"tokenizer:{len(self.tokenizer)}:{self.context_length}"

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

    def plain_token_ids(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.model.text_projection(pooled)

    def is_image_parameter(self, name: str) -> bool:
        return name.startswith(("vision_model.", "visual_projection."))

    def is_text_parameter(self, name: str) -> bool:
        return name.startswith(("text_model.", "text_projection."))


def _processor_stats(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return CLIP_MEAN, CLIP_STD
    data = json.loads(file.read_text())
    return tuple(data.get("image_mean", CLIP_MEAN)), tuple(data.get("image_std", CLIP_STD))


def load_clip(
    name_or_path: str | Path,
    *,
    backend: Backend = "hf",
    pretrained: str | None = None,
    preprocess: PadMode = "targetpad",
    target_ratio: float = 1.25,
    device: str | torch.device = "cpu",
) -> ClipBundle:
    """Load a CLIP (either family) with its tokenizer and CIR preprocessing.

    Args:
        name_or_path: hf: e.g. ``openai/clip-vit-base-patch32`` or a ``save_pretrained`` folder; open_clip: an
            architecture name such as ``RN50x4``.
        backend: ``hf`` or ``open_clip``.
        pretrained: open_clip only: a pretrained tag of the architecture or a local weights file (None =
            random initialisation, for tests).
        preprocess: ``targetpad`` (CLIP4Cir's default: pad only images whose aspect ratio exceeds
            ``target_ratio``), ``squarepad`` (always pad to a square) or ``none`` (the model's own resize/crop).
        target_ratio: the aspect-ratio threshold of target padding (1.25 in CLIP4Cir).
        device: where the model is placed.
    """
    if preprocess not in ("targetpad", "squarepad", "none"):
        raise ConfigError(f"preprocess={preprocess!r}; valid: targetpad, squarepad, none")
    if backend == "open_clip":
        from capret.models.openclip import load_open_clip

        return load_open_clip(
            str(name_or_path),
            pretrained=pretrained,
            preprocess=preprocess,
            target_ratio=target_ratio,
            device=device,
        )
    if backend != "hf":
        raise ConfigError(f"clip backend={backend!r}; valid: hf, open_clip")
    if pretrained is not None:
        raise ConfigError(
            f"clip.pretrained={pretrained!r} is only for backend open_clip; an hf CLIP is named by clip.name"
        )
    return _load_hf_clip(name_or_path, preprocess=preprocess, target_ratio=target_ratio, device=device)


def load_clip_config(
    config: ClipConfig,
    *,
    preprocess: PadMode = "targetpad",
    target_ratio: float = 1.25,
    device: str | torch.device = "cpu",
) -> ClipBundle:
    """:func:`load_clip` for a :class:`ClipConfig` section."""
    return load_clip(
        config.name,
        backend=config.backend,
        pretrained=config.pretrained,
        preprocess=preprocess,
        target_ratio=target_ratio,
        device=device,
    )


def load_task_clip_config(config: TaskClipConfig, *, device: str | torch.device = "cpu") -> ClipBundle:
    """:func:`load_clip` for a task's ``model.clip`` section, with the preprocessing it records."""
    return load_clip_config(
        config, preprocess=config.preprocess, target_ratio=config.target_ratio, device=device
    )


def _load_hf_clip(
    name_or_path: str | Path, *, preprocess: PadMode, target_ratio: float, device: str | torch.device
) -> HFClipBundle:
    from transformers import AutoTokenizer, CLIPModel

    from capret.data.transforms import clip_transform

    check_weights_folder(name_or_path)  # a local folder of pickles or a truncated file: refused, named
    model: Any = CLIPModel.from_pretrained(str(name_or_path))
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    size = int(model.config.vision_config.image_size)
    local = Path(name_or_path)
    mean, std = _processor_stats(local) if local.is_dir() else (CLIP_MEAN, CLIP_STD)
    pad = None if preprocess == "none" else preprocess
    transform = clip_transform(size, pad=pad, target_ratio=target_ratio, mean=mean, std=std)
    preprocess_id = f"{preprocess}:{target_ratio}:{size}:{mean}:{std}"
    return HFClipBundle(
        model,
        tokenizer=tokenizer,
        transform=transform,
        name=str(name_or_path),
        preprocess_id=preprocess_id,
    )
