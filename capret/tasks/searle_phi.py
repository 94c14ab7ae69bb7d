"""Training task ``phi``: SEARLE's textual-inversion network (Baldrati et al., ICCV 2023, Sec. 4.2).

phi maps a CLIP image feature to a pseudo-word token in one forward pass, distilling the tokens OTI found by
per-image optimisation (``capret oti``): on an unlabeled image collection, the predicted tokens and the OTI
(EMA) tokens of a batch are contrasted with a symmetric NT-Xent loss (temperature 0.25), plus the phrase
regulariser of OTI (an LLM phrase about one of the image's top-k CLIP concepts, *every* occurrence of the concept
replaced by ``$`` as SEARLE's ``train_phi.py`` does, must keep the phrase's text feature; cosine loss). Defaults
are the paper's (ICCV 2023, Sec. 5 / supplementary): weights 1 and 0.75, the phrases of the 150 nearest concepts;
the released ``train_phi.py`` defaults are 0.25 and 15 (``loss.lambda_gpt=0.25 loss.top_k_concepts=15``).
AdamW lr 1e-4, weight decay 0.01, batch 256.

CLIP stays frozen and image features are computed once (feature cache), so a step is a small MLP forward plus
one text-encoder pass for the regulariser. Inference: :func:`capret.inference.cir.inversion.searle_query_features`.
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
from capret.inference.cir.concepts import PhraseBank, concept_features, top_concepts
from capret.inference.cir.oti import TokenStore
from capret.losses.distillation import nt_xent_loss
from capret.tasks import zeroshot_common as common
from capret.tasks.registry import register_task

__all__ = ["PhiDataConfig", "PhiLossConfig", "PhiTask", "PhiTaskConfig", "mask_concept", "run"]


@dataclass
class PhiDataConfig(common.ImageDataConfig):
    """The unlabeled images, their OTI tokens (the distillation targets) and the regulariser's phrases."""

    tokens: str = cfg("runs/oti/tokens.safetensors", "OTI token store of these images (capret oti --out)")
    phrases: str | None = cfg(None, "phrase file of the regulariser (capret oti --phrases-out); null = off")


@dataclass
class PhiLossConfig:
    """Distillation of the OTI tokens plus SEARLE's phrase regulariser."""

    temperature: float = cfg(0.25, "NT-Xent temperature of the distillation")
    lambda_distil: float = cfg(1.0, "weight of the distillation loss")
    lambda_gpt: float = cfg(
        0.75, "weight of the phrase regulariser (paper 0.75; SEARLE's code 0.25); 0 = off"
    )
    top_k_concepts: int = cfg(
        150, "concepts per image the regulariser draws phrases from (paper 150; code 15)"
    )


@dataclass
class PhiTaskConfig:
    """Config of ``capret-train`` task ``phi`` (see configs/searle_phi_demo.yaml)."""

    task: str = cfg("phi", "task name; must be 'phi'")
    data: PhiDataConfig = cfg(
        factory=PhiDataConfig, help="images, OTI tokens, phrases, batches, feature cache"
    )
    model: common.MapperModelConfig = cfg(
        factory=common.MapperModelConfig, help="frozen CLIP (SEARLE: ViT-B/32 or ViT-L/14) and phi's sizes"
    )
    loss: PhiLossConfig = cfg(factory=PhiLossConfig, help="distillation and phrase regulariser")
    validation: common.MapperValidationConfig = common.mapper_validation()
    trainer: TrainerConfig = common.mapper_trainer(weight_decay=0.01)


def mask_concept(phrase: str, concept: str, *, placeholder: str = "$") -> str:
    """``phrase`` with *every* occurrence of ``concept`` replaced by the placeholder (SEARLE's ``train_phi.py``:
    ``gpt_phrase.replace(w, " $ ")``), whitespace collapsed."""
    return " ".join(phrase.replace(concept, f" {placeholder} ").split())


class PhiTask(common.MapperTaskBase):
    """The :class:`capret.engine.trainer.TrainTask` of SEARLE's phi."""

    mapper_kind = "phi"
    method = "searle"

    def __init__(self, config: PhiTaskConfig) -> None:
        super().__init__(config)
        data = config.data
        # a training folder named by the run's own config: its links are followed, as they always were
        self.source = open_image_source(data.images, limit=data.limit, follow_symlinks=True)
        store_keys, _, ema, _ = TokenStore.read(data.tokens)
        index = {k: i for i, k in enumerate(store_keys)}
        missing = [k for k in self.source.keys if k not in index]
        if missing:
            raise ConfigError(
                f"{len(missing)} of {len(self.source)} images have no OTI token in data.tokens={data.tokens} "
                f"(e.g. {missing[0]!r}); run `capret oti --images {data.images} --out {data.tokens}` first"
            )
        self.targets = ema[[index[k] for k in self.source.keys]]
        self.bank = PhraseBank.load(data.phrases) if data.phrases and config.loss.lambda_gpt > 0 else None
        clip = self.load_frozen_clip()
        if self.targets.shape[1] != clip.token_width:
            raise ConfigError(
                f"OTI tokens in {data.tokens} are {self.targets.shape[1]} wide but {clip.name} tokens are "
                f"{clip.token_width}: the store was made with another CLIP"
            )
        self.features: torch.Tensor | None = None
        self.candidates: list[list[tuple[str, str]]] = []

    def _prepare(self) -> None:
        if self.features is not None:
            return
        self.features = self.image_table(self.source).lookup(self.source.keys)
        if self.bank is not None:
            clip = self.follow_mapper()
            concepts = self.bank.concepts
            nearest = top_concepts(
                self.features, concept_features(clip, concepts), k=self.config.loss.top_k_concepts
            )
            self.candidates = [
                [(concepts[i], p) for i in row for p in self.bank.phrases[concepts[i]]]
                for row in nearest.tolist()
            ]

    def train_dataloader(self, *, rank: int, world_size: int, epoch: int, seed: int) -> common.SizedBatches:
        self._prepare()
        return self.batches(
            len(self.source), self._batch, rank=rank, world_size=world_size, epoch=epoch, seed=seed
        )

    def _batch(self, idx: list[int]) -> dict[str, Any]:
        assert self.features is not None
        return {"features": self.features[idx], "targets": self.targets[idx], "index": torch.tensor(idx)}

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        loss, placeholder = self.config.loss, self.config.model.placeholder
        predicted = model(batch["features"])
        distil = nt_xent_loss(predicted, batch["targets"], temperature=loss.temperature)
        terms = {"distil": distil}
        total = loss.lambda_distil * distil
        if self.bank is not None:
            terms["gpt"] = torch.zeros((), device=predicted.device)
            rows = [i for i, c in enumerate(batch["index"].tolist()) if self.candidates[c]]
            if rows:
                clip = self.follow_mapper()
                draws = [
                    self.candidates[c][int(torch.randint(len(self.candidates[c]), ()))]
                    for c in batch["index"][rows].tolist()
                ]
                swapped = [
                    mask_concept(phrase, concept, placeholder=placeholder) for concept, phrase in draws
                ]
                with torch.no_grad():
                    target = clip.encode_text([phrase for _, phrase in draws])
                inverted = clip.pseudo_token_features(swapped, predicted[rows], placeholder=placeholder)
                gpt = (1 - F.cosine_similarity(inverted.float(), target.float(), dim=-1)).mean()
                terms["gpt"] = gpt
                total = total + loss.lambda_gpt * gpt
        return {"loss": total, **terms}


def run(config: PhiTaskConfig, *, resume: str | None = None) -> dict[str, Any]:
    """Train phi, then export the ``phi`` model folder (``<trainer.output_dir>/model``)."""
    return common.run_mapper_task(PhiTask, config, name="phi", resume=resume)


register_task("phi", PhiTaskConfig, run)
