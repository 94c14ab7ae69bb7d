"""Training task ``pic2word``: Pic2Word's image-to-word mapping (Saito et al., CVPR 2023).

IM2TEXT maps a frozen CLIP image feature to a pseudo-word token ``*``. Trained on unlabeled images only: the text
feature of ``"a photo of *"`` with ``*`` = IM2TEXT(image feature) must retrieve its own image among the batch and
vice versa — the symmetric image-text contrastive loss of CLIP with CLIP's own (frozen) logit scale. The paper
trains on Conceptual Captions images with AdamW lr 1e-4, weight decay 0.1, batch 128. Inference prompt:
``"a photo of * , {caption}"`` (:func:`capret.inference.zeroshot.pic2word_query_features`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from capret.config import ConfigError, cfg
from capret.data.image_sources import open_image_source
from capret.engine.trainer import TrainerConfig, train
from capret.models.clip import ClipConfig
from capret.tasks.registry import register_task
from capret.tasks.zeroshot_common import MapperTaskBase, SizedBatches, index_batches

__all__ = ["Pic2WordTask", "Pic2WordTaskConfig", "run"]


@dataclass
class Pic2WordTaskConfig:
    """Config of ``capret-train`` task ``pic2word`` (see configs/pic2word_demo.yaml)."""

    task: str = cfg("pic2word", "task name; must be 'pic2word'")
    clip: ClipConfig = cfg(factory=ClipConfig, help="frozen CLIP backbone (Pic2Word: ViT-L/14)")
    preprocess: Literal["targetpad", "squarepad", "none"] = cfg(
        "none", "image padding before the CLIP transform: targetpad | squarepad | none"
    )
    target_ratio: float = cfg(1.25, "aspect-ratio threshold of targetpad")
    images: str = cfg("data/cc3m", "unlabeled images: a folder (recursive) or webdataset .tar shards")
    limit: int | None = cfg(None, "use only the first N images (sorted keys)")
    prompt: str = cfg("a photo of *", "training prompt; must contain the placeholder")
    placeholder: str = cfg("*", "pseudo-word placeholder (one token)")
    hidden_dim: int = cfg(512, "IM2TEXT hidden width")
    dropout: float = cfg(0.1, "IM2TEXT dropout")
    lr: float = cfg(1e-4, "AdamW learning rate")
    weight_decay: float = cfg(0.1, "AdamW weight decay")
    batch_size: int = cfg(128, "images per batch per process (the contrastive negatives)")
    feature_cache: str | None = cfg("auto", "image-feature cache folder; auto = <output_dir>/feature_cache")
    eval_batch_size: int = cfg(64, "images per batch when computing features")
    trainer: TrainerConfig = cfg(factory=TrainerConfig, help="shared training loop settings")


class Pic2WordTask(MapperTaskBase):
    """The :class:`capret.engine.trainer.TrainTask` of Pic2Word's IM2TEXT."""

    mapper_kind = "pic2word"
    method = "pic2word"

    def __init__(self, config: Pic2WordTaskConfig) -> None:
        super().__init__(config)
        if f" {config.placeholder}" not in f" {config.prompt} ":
            raise ConfigError(
                f"prompt={config.prompt!r} must contain the placeholder {config.placeholder!r} as a word"
            )
        self.source = open_image_source(config.images, limit=config.limit)
        clip = self.load_frozen_clip(config.clip, preprocess=config.preprocess, ratio=config.target_ratio)
        clip.placeholder_id(config.placeholder)  # fail before training if it is not one token
        self.features: torch.Tensor | None = None

    def mapper_hparams(self) -> dict[str, Any]:
        assert self.clip is not None
        return {
            "input_dim": self.clip.feature_dim,
            "hidden_dim": self.config.hidden_dim,
            "output_dim": self.clip.token_width,
            "dropout": self.config.dropout,
        }

    def train_dataloader(self, *, rank: int, world_size: int, epoch: int, seed: int) -> SizedBatches:
        if self.features is None:
            self.features = self.image_table(self.source).lookup(self.source.keys)
        batches = index_batches(
            len(self.source),
            batch_size=self.config.batch_size,
            rank=rank,
            world_size=world_size,
            epoch=epoch,
            seed=seed,
        )
        assert self.features is not None
        features = self.features
        return SizedBatches(batches, lambda idx: {"features": features[idx]})

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        clip = self.follow_mapper()
        images = batch["features"]
        tokens = model(images)
        texts = clip.pseudo_token_features(
            [self.config.prompt] * images.shape[0], tokens, placeholder=self.config.placeholder
        )
        image_n = F.normalize(images.float(), dim=-1)
        text_n = F.normalize(texts.float(), dim=-1)
        logits = clip.logit_scale * image_n @ text_n.T
        labels = torch.arange(images.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return {"loss": loss}


def run(config: Pic2WordTaskConfig, *, resume: str | None = None) -> dict[str, Any]:
    """Train IM2TEXT; returns the trainer's summary (checkpoints under ``trainer.output_dir``)."""
    if config.task != "pic2word":
        raise ConfigError(f"task={config.task!r}: this runner trains task 'pic2word'")
    return train(Pic2WordTask(config), config.trainer, resume=resume)


register_task("pic2word", Pic2WordTaskConfig, run)
