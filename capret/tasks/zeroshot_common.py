"""What the three zero-shot mapper tasks (``phi``, ``pic2word``, ``lincir``) share.

Each trains only a small mapping network on top of a *frozen* CLIP, so: the CLIP is loaded once and follows the
mapper to the trainer's device; image features of an unlabeled image collection are computed once through the
feature cache (:mod:`capret.inference.cir.features`); batches are index lists that depend only on
``(rank, world_size, epoch, seed)`` (the trainer's resume contract); and the checkpoint sidecar records the
mapper's family and sizes so :func:`capret.inference.cir.inversion.load_zeroshot_model` rebuilds it from the
folder alone.

Their configs have the shape of every task: ``data`` (what is trained on, batch size, feature cache), ``model``
(the frozen CLIP with its preprocessing, the mapper's sizes, the placeholder), ``loss`` (the method's objective)
and ``trainer`` (the shared loop, including ``lr`` and ``weight_decay`` as in the dual-stream and detector tasks).
Sidecars written with the earlier flat keys go through :func:`upgrade_config_dict`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capret.config import cfg, set_nested, to_dict
from capret.data.image_sources import ImageSource
from capret.inference.cir.features import CachedFeatures, image_features
from capret.models.clip import ClipBundle, TaskClipConfig, load_task_clip_config

__all__ = [
    "ImageDataConfig",
    "MapperModelConfig",
    "MapperTaskBase",
    "SizedBatches",
    "ZEROSHOT_TASKS",
    "index_batches",
    "upgrade_config_dict",
]

#: the ``capret-train`` tasks whose checkpoints :func:`capret.inference.cir.inversion.load_zeroshot_model` reads
ZEROSHOT_TASKS = ("phi", "pic2word", "lincir")


@dataclass
class ImageDataConfig:
    """The unlabeled image collection of an image-trained mapper (``phi``, ``pic2word``)."""

    images: str = cfg("data/unlabeled", "unlabeled images: a folder (recursive) or webdataset .tar shards")
    limit: int | None = cfg(None, "use only the first N images (sorted keys)")
    batch_size: int = cfg(256, "images per batch per process (the contrastive negatives)")
    feature_cache: str | None = cfg("auto", "image-feature cache folder; auto = <output_dir>/feature_cache")
    encode_batch_size: int = cfg(64, "images per batch when computing features")


@dataclass
class MapperModelConfig:
    """The frozen CLIP and the trainable mapper on top of it."""

    clip: TaskClipConfig = cfg(
        factory=TaskClipConfig, help="frozen CLIP backbone and its image preprocessing"
    )
    hidden_dim: int = cfg(0, "mapper hidden width; 0 = 4 x CLIP feature size")
    dropout: float = cfg(0.5, "mapper dropout")
    placeholder: str = cfg("$", "pseudo-word placeholder (one token of the CLIP tokenizer)")


#: where each key of the flat config of the first zero-shot checkpoints now lives
_FLAT_KEYS: dict[str, tuple[str, ...]] = {
    "images": ("data", "images"),
    "captions": ("data", "captions"),
    "tokens": ("data", "tokens"),
    "phrases": ("data", "phrases"),
    "limit": ("data", "limit"),
    "batch_size": ("data", "batch_size"),
    "feature_cache": ("data", "feature_cache"),
    "eval_batch_size": ("data", "encode_batch_size"),
    "preprocess": ("model", "clip", "preprocess"),
    "target_ratio": ("model", "clip", "target_ratio"),
    "hidden_dim": ("model", "hidden_dim"),
    "dropout": ("model", "dropout"),
    "placeholder": ("model", "placeholder"),
    "prompt": ("loss", "prompt"),
    "temperature": ("loss", "temperature"),
    "lambda_distil": ("loss", "lambda_distil"),
    "lambda_gpt": ("loss", "lambda_gpt"),
    "top_k_concepts": ("loss", "top_k_concepts"),
    "noise": ("loss", "noise"),
    "lr": ("trainer", "lr"),
    "weight_decay": ("trainer", "weight_decay"),
}

#: flat keys a task carried without using them (dropped on upgrade)
_UNUSED: dict[str, frozenset[str]] = {"lincir": frozenset({"feature_cache"})}


def upgrade_config_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """A ``phi``/``pic2word``/``lincir`` config dict in today's sectioned shape.

    The first checkpoints of these tasks recorded a flat config (``clip``, ``images``, ``lr``, ``hidden_dim``,
    ...); each key is moved to where :data:`_FLAT_KEYS` says it lives now (a flat ``clip`` section becomes
    ``model.clip``; flat ``lr``/``weight_decay`` win over the trainer's, which those tasks did not read). A dict
    already in today's shape, or of another task, is returned unchanged, so this is safe on any sidecar.
    """
    if raw.get("task") not in ZEROSHOT_TASKS or "model" in raw or "data" in raw:
        return raw
    unused = _UNUSED.get(str(raw["task"]), frozenset())
    out: dict[str, Any] = {
        k: v for k, v in raw.items() if k not in _FLAT_KEYS and k != "clip" and k not in unused
    }
    out["trainer"] = dict(out.get("trainer") or {})
    clip = raw.get("clip")
    if clip is not None:
        section = {"backend": "hf", "name": clip} if isinstance(clip, str) else dict(clip)
        out.setdefault("model", {})["clip"] = section
    for key, where in _FLAT_KEYS.items():
        if key not in raw or key in unused:
            continue
        set_nested(out, where, raw[key], what=f"flat config key {key!r}")
    return out


def index_batches(
    count: int, *, batch_size: int, rank: int, world_size: int, epoch: int, seed: int
) -> list[list[int]]:
    """Shuffled, equally sized index batches of this rank (drop-last), determined by the arguments alone."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(count, generator=g).tolist()
    per_rank = count // world_size // batch_size * batch_size
    if per_rank == 0:
        raise ValueError(
            f"{count} training examples cannot fill one batch of {batch_size} on each of {world_size} "
            "process(es); lower batch_size"
        )
    mine = order[rank::world_size][:per_rank]
    return [mine[i : i + batch_size] for i in range(0, per_rank, batch_size)]


class SizedBatches:
    """An iterable of batches with ``len()`` (the trainer derives steps per epoch from it)."""

    def __init__(self, batches: list[list[int]], make: Any) -> None:
        self.batches, self.make = batches, make

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self.make(idx) for idx in self.batches)


class MapperTaskBase:
    """Frozen CLIP + trainable mapper; subclasses build the mapper, batches and loss."""

    #: mapper family recorded in checkpoints (a key of :data:`capret.models.zeroshot.MAPPERS`)
    mapper_kind = ""
    #: zero-shot method the checkpoint serves at inference (searle, pic2word, lincir)
    method = ""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.clip: ClipBundle | None = None
        self.mapper: nn.Module | None = None

    def load_frozen_clip(self) -> ClipBundle:
        clip = load_task_clip_config(self.config.model.clip)
        clip.requires_grad_(False).eval()
        self.clip = clip
        return clip

    def mapper_hparams(self) -> dict[str, Any]:
        """Sizes of the mapper (from the loaded CLIP's dimensions and the config)."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        from capret.models.zeroshot import build_mapper

        self.mapper = build_mapper(self.mapper_kind, self.mapper_hparams())
        return self.mapper

    def follow_mapper(self) -> ClipBundle:
        """The frozen CLIP, moved to the device the trainer put the mapper on."""
        assert self.clip is not None and self.mapper is not None
        device = next(self.mapper.parameters()).device
        if self.clip.device != device:
            self.clip.to(device)
        return self.clip

    def cache_dir(self) -> Path | None:
        value = self.config.data.feature_cache
        if value is None:
            return None
        return Path(self.config.trainer.output_dir) / "feature_cache" if value == "auto" else Path(value)

    def image_table(self, source: ImageSource) -> CachedFeatures:
        """Raw CLIP image features of every image of ``source`` (computed once, cached on disk)."""
        clip = self.follow_mapper()
        return image_features(
            clip,
            source.keys,
            load_image=source.load,
            cache_dir=self.cache_dir(),
            batch_size=self.config.data.encode_batch_size,
            num_workers=self.config.trainer.num_workers,
        )

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """One group at ``trainer.lr`` / ``trainer.weight_decay`` (the frozen CLIP is not in the model)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "name": self.mapper_kind}]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """No validation set: zero-shot mappers are scored by ``capret-eval`` on the benchmarks."""
        del model
        return {}

    def config_dict(self) -> dict[str, Any]:
        """The task config plus the mapper's family/sizes and inference settings (for the loader)."""
        return {
            **to_dict(self.config),
            "zeroshot": {
                "method": self.method,
                "mapper": self.mapper_kind,
                "hparams": self.mapper_hparams(),
                "placeholder": self.config.model.placeholder,
            },
        }
