"""Training task ``pic2word``: Pic2Word's image-to-word mapping (Saito et al., CVPR 2023).

IM2TEXT maps a frozen CLIP image feature to a pseudo-word token ``*``. Trained on unlabeled images only: the text
feature of ``"a photo of *"`` with ``*`` = IM2TEXT(image feature) must retrieve its own image among the batch and
vice versa — the symmetric image-text contrastive loss of CLIP with CLIP's own (frozen) logit scale. The paper
trains on Conceptual Captions images with AdamW lr 1e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.1 on the
weights only (``src/main.py``: no decay on biases, norms and the logit scale; :meth:`Pic2WordTask.param_groups`),
batch 128. Inference prompt:
``"a photo of * , {caption}"`` (:func:`capret.inference.cir.inversion.pic2word_query_features`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capret.config import ConfigError, cfg
from capret.data.image_sources import open_image_source
from capret.engine.trainer import TrainerConfig
from capret.models.clip import TaskClipConfig
from capret.tasks import zeroshot_common as common
from capret.tasks.registry import register_task

__all__ = ["Pic2WordLossConfig", "Pic2WordTask", "Pic2WordTaskConfig", "run"]


@dataclass
class Pic2WordLossConfig:
    """CLIP's symmetric image-text contrastive loss (CLIP's own frozen logit scale) on the training prompt."""

    prompt: str = cfg("a photo of *", "training prompt; must contain model.placeholder as a word")


@dataclass
class Pic2WordTaskConfig:
    """Config of ``capret-train`` task ``pic2word`` (see configs/pic2word_demo.yaml)."""

    task: str = cfg("pic2word", "task name; must be 'pic2word'")
    data: common.ImageDataConfig = cfg(
        factory=lambda: common.ImageDataConfig(images="data/cc3m", batch_size=128),
        help="unlabeled images, batches, feature cache",
    )
    model: common.MapperModelConfig = cfg(
        factory=lambda: common.MapperModelConfig(
            clip=TaskClipConfig(preprocess="none"), hidden_dim=512, dropout=0.1, placeholder="*"
        ),
        help="frozen CLIP (Pic2Word: ViT-L/14, CLIP's own preprocessing) and IM2TEXT's sizes",
    )
    loss: Pic2WordLossConfig = cfg(factory=Pic2WordLossConfig, help="contrastive loss")
    validation: common.MapperValidationConfig = common.mapper_validation()
    trainer: TrainerConfig = common.mapper_trainer(weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)


class Pic2WordTask(common.MapperTaskBase):
    """The :class:`capret.engine.trainer.TrainTask` of Pic2Word's IM2TEXT."""

    mapper_kind = "pic2word"
    method = "pic2word"

    def __init__(self, config: Pic2WordTaskConfig) -> None:
        super().__init__(config)
        prompt, placeholder = config.loss.prompt, config.model.placeholder
        if f" {placeholder}" not in f" {prompt} ":
            raise ConfigError(
                f"loss.prompt={prompt!r} must contain model.placeholder={placeholder!r} as a word"
            )
        # a training folder named by the run's own config: its links are followed, as they always were
        self.source = open_image_source(config.data.images, limit=config.data.limit, follow_symlinks=True)
        clip = self.load_frozen_clip()
        clip.placeholder_id(placeholder)  # fail before training if it is not one token
        self.features: torch.Tensor | None = None

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Pic2Word's two AdamW groups: weights at ``trainer.weight_decay``, biases and norms without decay."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [
            {
                "params": [p for n, p in named if common.no_decay_parameter(n)],
                "weight_decay": 0.0,
                "name": "no_decay",
            },
            {"params": [p for n, p in named if not common.no_decay_parameter(n)], "name": "pic2word"},
        ]
        return [g for g in groups if g["params"]]

    def train_dataloader(self, *, rank: int, world_size: int, epoch: int, seed: int) -> common.SizedBatches:
        if self.features is None:
            self.features = self.image_table(self.source).lookup(self.source.keys)
        features = self.features
        return self.batches(
            len(self.source), lambda idx: {"features": features[idx]}, rank=rank, world_size=world_size,
            epoch=epoch, seed=seed,
        )  # fmt: skip

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        clip = self.follow_mapper()
        images = batch["features"]
        tokens = model(images)
        texts = clip.pseudo_token_features(
            [self.config.loss.prompt] * images.shape[0], tokens, placeholder=self.config.model.placeholder
        )
        image_n = F.normalize(images.float(), dim=-1)
        text_n = F.normalize(texts.float(), dim=-1)
        logits = clip.logit_scale * image_n @ text_n.T
        labels = torch.arange(images.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return {"loss": loss}


def run(config: Pic2WordTaskConfig, *, resume: str | None = None) -> dict[str, Any]:
    """Train IM2TEXT, then export the ``pic2word`` model folder (``<trainer.output_dir>/model``)."""
    return common.run_mapper_task(Pic2WordTask, config, name="pic2word", resume=resume)


register_task("pic2word", Pic2WordTaskConfig, run)
