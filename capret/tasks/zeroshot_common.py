"""What the three zero-shot mapper tasks (``phi``, ``pic2word``, ``lincir``) share.

Each trains only a small mapping network on top of a *frozen* CLIP, so: the CLIP is loaded once and follows the
mapper to the trainer's device; image features of an unlabeled image collection are computed once through the
feature cache (:mod:`capret.inference.feature_cache`); batches are index lists that depend only on
``(rank, world_size, epoch, seed)`` (the trainer's resume contract); and the checkpoint sidecar records the
mapper's family and sizes so :func:`capret.inference.zeroshot.load_zeroshot_model` rebuilds it from the
folder alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capret.config import to_dict
from capret.data.image_sources import ImageSource
from capret.inference.feature_cache import CachedFeatures, image_features
from capret.models.clip import ClipBundle, ClipConfig, load_clip_config

__all__ = ["MapperTaskBase", "SizedBatches", "index_batches"]


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

    def load_frozen_clip(
        self, clip_config: ClipConfig, *, preprocess: str = "targetpad", ratio: float = 1.25
    ) -> ClipBundle:
        clip = load_clip_config(clip_config, preprocess=preprocess, target_ratio=ratio)  # type: ignore[arg-type]
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
        value = self.config.feature_cache
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
            batch_size=self.config.eval_batch_size,
            num_workers=self.config.trainer.num_workers,
        )

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [
            {
                "params": [p for p in model.parameters() if p.requires_grad],
                "lr": self.config.lr,
                "weight_decay": self.config.weight_decay,
                "name": self.mapper_kind,
            }
        ]

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
                "placeholder": self.config.placeholder,
            },
        }
