"""Training task ``lincir``: language-only training of the pseudo-word projection (LinCIR, Gu et al., CVPR 2024).

No image is seen. For a caption, its keyword spans (determiner/adjective/noun runs: :mod:`capret.data.keywords`)
are replaced by the pseudo-word ``$``; phi maps the caption's own CLIP *text* feature, perturbed with noise, to
the token, and the edited caption with ``$`` = phi(...) must reproduce the caption's text feature (MSE between
projected text features). The noise bridges the modality gap so that at inference an *image* feature can be fed
instead: ``x + U(0, 1) * N(0, I)``, one uniform scale per caption. phi: input = CLIP projection size, hidden 4x,
output = token width, dropout 0.5; AdamW lr 1e-4, weight decay 0.01, batch 256, constant schedule with 500
warmup steps. Any caption corpus works, including our caption stores (JSONL).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capret.config import cfg
from capret.data.keywords import read_caption_corpus, replace_keywords
from capret.engine.trainer import TrainerConfig
from capret.tasks.registry import register_task
from capret.tasks.zeroshot_common import (
    MapperModelConfig,
    MapperTaskBase,
    SizedBatches,
    mapper_trainer,
    run_mapper_task,
)

__all__ = ["LinCIRDataConfig", "LinCIRLossConfig", "LinCIRTask", "LinCIRTaskConfig", "run"]


@dataclass
class LinCIRDataConfig:
    """The caption corpus (no images are seen in training)."""

    captions: str = cfg(
        "data/captions.jsonl", "caption corpus: .jsonl caption store, .json list, or one per line"
    )
    limit: int | None = cfg(None, "use only the first N captions")
    batch_size: int = cfg(256, "captions per batch per process")
    encode_batch_size: int = cfg(256, "captions per batch when tokenizing the edited captions up front")


@dataclass
class LinCIRLossConfig:
    """MSE between the edited caption's text feature and the caption's own; noise on phi's input."""

    noise: float = cfg(1.0, "scale of the input noise U(0,1)*N(0,I) added to the caption's text feature")


@dataclass
class LinCIRTaskConfig:
    """Config of ``capret-train`` task ``lincir`` (see configs/lincir_demo.yaml)."""

    task: str = cfg("lincir", "task name; must be 'lincir'")
    data: LinCIRDataConfig = cfg(factory=LinCIRDataConfig, help="caption corpus and batches")
    model: MapperModelConfig = cfg(
        factory=MapperModelConfig,
        help="frozen CLIP (LinCIR: ViT-L/14, ViT-bigG/14; preprocessing applies at inference) and phi's sizes",
    )
    loss: LinCIRLossConfig = cfg(factory=LinCIRLossConfig, help="text-feature reconstruction loss")
    trainer: TrainerConfig = mapper_trainer(weight_decay=0.01)


class LinCIRTask(MapperTaskBase):
    """The :class:`capret.engine.trainer.TrainTask` of LinCIR's phi."""

    mapper_kind = "phi"
    method = "lincir"

    def __init__(self, config: LinCIRTaskConfig) -> None:
        super().__init__(config)
        self.captions = read_caption_corpus(config.data.captions, limit=config.data.limit)
        # the edit of each caption is fixed (the random fallback word is seeded by the caption's position)
        self.replaced = [
            replace_keywords(c, placeholder=config.model.placeholder, rng=random.Random(i))
            for i, c in enumerate(self.captions)
        ]
        self._keep_placeholders(self.load_frozen_clip())

    def _keep_placeholders(self, clip: Any) -> None:
        """Edits whose placeholder falls beyond the context length become ``"a photo of $"`` (LinCIR's fallback)."""
        placeholder = self.config.model.placeholder
        pid = clip.placeholder_id(placeholder)
        step = self.config.data.encode_batch_size
        for start in range(0, len(self.replaced), step):
            ids = clip.tokenize(self.replaced[start : start + step])["input_ids"]
            for offset in (~(ids == pid).any(dim=1)).nonzero().flatten().tolist():
                self.replaced[start + offset] = f"a photo of {placeholder}"

    def train_dataloader(self, *, rank: int, world_size: int, epoch: int, seed: int) -> SizedBatches:
        def make(idx: list[int]) -> dict[str, Any]:
            return {"captions": [self.captions[i] for i in idx], "replaced": [self.replaced[i] for i in idx]}

        return self.batches(
            len(self.captions), make, rank=rank, world_size=world_size, epoch=epoch, seed=seed
        )

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        clip = self.follow_mapper()
        with torch.no_grad():
            tokens = {k: v.to(clip.device) for k, v in clip.tokenize(batch["captions"]).items()}
            original = clip.text_features(**tokens).float()
        scale = torch.rand(original.shape[0], 1, device=original.device)
        noisy = original + self.config.loss.noise * scale * torch.randn_like(original)
        pseudo = model(noisy)
        edited = clip.pseudo_token_features(
            batch["replaced"], pseudo, placeholder=self.config.model.placeholder
        )
        return {"loss": F.mse_loss(edited.float(), original)}


def run(config: LinCIRTaskConfig, *, resume: str | None = None) -> dict[str, Any]:
    """Train LinCIR's phi, then export the ``lincir`` model folder (``<trainer.output_dir>/model``)."""
    return run_mapper_task(LinCIRTask, config, name="lincir", resume=resume)


register_task("lincir", LinCIRTaskConfig, run)
