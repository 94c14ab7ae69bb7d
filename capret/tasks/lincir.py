"""Training task ``lincir``: language-only training of the pseudo-word projection (LinCIR, Gu et al., CVPR 2024).

No image is seen. For a caption (lower-cased, literal ``$`` removed), its keyword spans (determiner/adjective/noun
runs: spaCy's part-of-speech tags as LinCIR, or the word-list fallback: :mod:`capret.data.keywords`,
``data.keywords``) are replaced by the pseudo-word ``$`` — a caption without spans gets one random word replaced,
drawn again every epoch as LinCIR's dataset does; phi maps the caption's own CLIP *text* feature, perturbed with noise, to
the token, and the edited caption with ``$`` = phi(...) must reproduce the caption's text feature (MSE between
projected text features). The noise bridges the modality gap so that at inference an *image* feature can be fed
instead: ``x + U(0, 1) * N(0, I)``, one uniform scale per caption. phi: input = CLIP projection size, hidden 4x,
output = token width, dropout 0.5; AdamW lr 1e-4, weight decay 0.01, batch 256, constant learning rate
(``train_phi.py``'s ``--lr_scheduler constant``). At evaluation LinCIR feeds CLIP's own resize + centre crop
(``CLIPImageProcessor``), so ``model.clip.preprocess`` defaults to ``none`` here. Any caption corpus works,
including our caption stores (JSONL).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capret.config import ConfigError, cfg
from capret.data.keywords import (
    Tagger,
    clean_caption,
    keyword_spans,
    read_caption_corpus,
    replace_spans,
    spacy_tagger,
)
from capret.engine.trainer import TrainerConfig
from capret.errors import MissingDependencyError
from capret.models.clip import TaskClipConfig
from capret.tasks import zeroshot_common as common
from capret.tasks.registry import register_task

__all__ = ["LinCIRDataConfig", "LinCIRLossConfig", "LinCIRTask", "LinCIRTaskConfig", "keyword_tagger", "run"]

logger = logging.getLogger(__name__)


@dataclass
class LinCIRDataConfig:
    """The caption corpus (no images are seen in training)."""

    captions: str = cfg(
        "data/captions.jsonl", "caption corpus: .jsonl caption store, .json list, or one per line"
    )
    limit: int | None = cfg(None, "use only the first N captions")
    batch_size: int = cfg(256, "captions per batch per process")
    encode_batch_size: int = cfg(256, "captions per batch when tokenizing the edited captions up front")
    keywords: str = cfg(
        "auto",
        "keyword spans: spacy (LinCIR's POS tags; needs capret[nlp] + en_core_web_sm) | wordlist | auto (spacy "
        "when installed, else wordlist)",
    )


@dataclass
class LinCIRLossConfig:
    """MSE between the edited caption's text feature and the caption's own; noise on phi's input."""

    noise: float = cfg(1.0, "scale of the input noise U(0,1)*N(0,I) added to the caption's text feature")


@dataclass
class LinCIRTaskConfig:
    """Config of ``capret-train`` task ``lincir`` (see configs/lincir_demo.yaml)."""

    task: str = cfg("lincir", "task name; must be 'lincir'")
    data: LinCIRDataConfig = cfg(factory=LinCIRDataConfig, help="caption corpus and batches")
    model: common.MapperModelConfig = cfg(
        factory=lambda: common.MapperModelConfig(clip=TaskClipConfig(preprocess="none")),
        help="frozen CLIP (LinCIR: ViT-L/14, ViT-bigG/14; preprocessing applies at inference: none = CLIP's own "
        "centre crop, as LinCIR) and phi's sizes",
    )
    loss: LinCIRLossConfig = cfg(factory=LinCIRLossConfig, help="text-feature reconstruction loss")
    validation: common.MapperValidationConfig = common.mapper_validation()
    trainer: TrainerConfig = cfg(
        factory=lambda: TrainerConfig(lr=1e-4, weight_decay=0.01, schedule="constant", monitor="recall@1"),
        help="shared training loop (LinCIR: AdamW lr 1e-4, wd 0.01, constant schedule)",
    )


class LinCIRTask(common.MapperTaskBase):
    """The :class:`capret.engine.trainer.TrainTask` of LinCIR's phi."""

    mapper_kind = "phi"
    method = "lincir"

    def __init__(self, config: LinCIRTaskConfig) -> None:
        super().__init__(config)
        # LinCIR's clean_caption: lower-cased and every literal "$" removed (never an injection point)
        self.captions = [
            clean_caption(c) for c in read_caption_corpus(config.data.captions, limit=config.data.limit)
        ]
        self.tagger = keyword_tagger(config.data.keywords)
        self.spans = [keyword_spans(c, tagger=self.tagger) for c in self.captions]  # tagged once
        self.pid = self.load_frozen_clip().placeholder_id(config.model.placeholder)

    def edits(self, indices: list[int], *, epoch: int, seed: int) -> list[str]:
        """The edited captions of ``indices`` for this epoch: spans replaced, the fallback word of a caption
        without spans drawn again every epoch (seeded by seed, epoch and caption, so a resumed run repeats it),
        and an edit whose placeholder falls beyond the context length replaced by ``"a photo of $"`` (LinCIR)."""
        placeholder = self.config.model.placeholder
        out = [
            replace_spans(
                self.captions[i],
                self.spans[i],
                placeholder=placeholder,
                rng=random.Random(f"{seed}:{epoch}:{i}"),
                tagged=self.tagger is not None,
            )
            for i in indices
        ]
        clip = self.follow_mapper() if self.mapper is not None else self.clip
        assert clip is not None
        ids = clip.tokenize(out)["input_ids"]
        for row in (~(ids == self.pid).any(dim=1)).nonzero().flatten().tolist():
            out[row] = f"a photo of {placeholder}"
        return out

    def train_dataloader(self, *, rank: int, world_size: int, epoch: int, seed: int) -> common.SizedBatches:
        def make(idx: list[int]) -> dict[str, Any]:
            return {
                "captions": [self.captions[i] for i in idx],
                "replaced": self.edits(idx, epoch=epoch, seed=seed),
            }

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


def keyword_tagger(choice: str) -> Tagger | None:
    """The tagger of ``data.keywords``: spaCy for ``spacy`` (an error naming the install commands if missing),
    None (word lists) for ``wordlist``, and for ``auto`` spaCy when it and its model load, else the word lists."""
    if choice == "wordlist":
        return None
    if choice == "spacy":
        return spacy_tagger()
    if choice != "auto":
        raise ConfigError(f"data.keywords={choice!r}; valid: spacy, wordlist, auto")
    try:
        return spacy_tagger()
    except MissingDependencyError:
        logger.info("spaCy or en_core_web_sm is not installed: LinCIR keyword spans from the word lists")
        return None


def run(config: LinCIRTaskConfig, *, resume: str | None = None) -> dict[str, Any]:
    """Train LinCIR's phi, then export the ``lincir`` model folder (``<trainer.output_dir>/model``)."""
    return common.run_mapper_task(LinCIRTask, config, name="lincir", resume=resume)


register_task("lincir", LinCIRTaskConfig, run)
