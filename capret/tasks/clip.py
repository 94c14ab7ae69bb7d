"""Training task ``clip``: a small open_clip model pretrained contrastively on image-text pairs.

No pretrained CLIP can be downloaded here, so the composed-retrieval methods (Combiner, SEARLE, Pic2Word, LinCIR,
CIReVL), the ``clip`` caption backend and the optional initialisation of the dual-stream streams all stand on a
CLIP the package trains itself on the garment world's pretraining split (``pretrain/train.jsonl``: an image and
an alt-text-like description per line). The recipe is CLIP's (Radford et al., 2021, Sec. 2.3-2.5): symmetric
InfoNCE over the batch with a learned temperature (open_clip's ``ClipLoss``, gathered across ranks under
torchrun), initial temperature 0.07, logit scale clamped at 100, AdamW with weight decay on matrices only
(open_clip's exclusion of gains, biases, embeddings and the temperature), warmup then cosine.

The architecture is a config section (:class:`capret.models.clip_arch.ClipArchConfig`) built by open_clip's own
``CLIP`` class, tokenised by open_clip's bundled BPE tokenizer. Images are decoded and preprocessed once, with
the exact preprocessing of the exported folder, and kept as float16 tensors: every epoch reuses them, and a
horizontal flip is the only augmentation (``data.augment``), so what the model sees at training and at use
differs only by that flip.

Checkpoints are selected on the held-out pairs of ``data.val_file`` (image-to-text and text-to-image R@1), and
the selected weights are exported as a ``kind: clip`` folder (open_clip's ``local-dir:`` layout +
``capret_model.json``) that :func:`capret.models.clip.load_clip` (backend ``open_clip``), ``capret.load`` and
``open_clip.create_model_and_transforms("local-dir:...")`` read. :func:`evaluate_clip` and
:func:`zero_shot_category_accuracy` score an exported folder on any split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from capret.config import ConfigError, cfg, from_dict, to_dict
from capret.data.garments.vocab import CATEGORIES as GARMENT_CATEGORIES
from capret.data.image_text import ImageTextPair, read_image_text_pairs
from capret.data.imagefile import decode_image
from capret.engine.checkpoint import git_revision, load_model_weights, package_versions
from capret.engine.distributed import DistContext
from capret.engine.trainer import TrainerConfig, unwrap_model
from capret.errors import DataError
from capret.evaluation.metrics import recall_at_k
from capret.io import load_safetensors
from capret.models.clip_arch import (
    CLIP_WEIGHTS_FILE,
    ClipArchConfig,
    build_open_clip,
    load_clip_folder,
    read_clip_sidecar,
    wrap_in_memory,
    write_clip_folder,
)
from capret.models.clip_base import ClipBundle
from capret.models.clip_zeroshot import Box, class_embeddings, encode_pil_images, zero_shot_scores
from capret.tasks.registry import register_task
from capret.tasks.train_export import check_task_name, train_and_export

__all__ = [
    "ClipDataConfig",
    "ClipEvalConfig",
    "ClipLossConfig",
    "ClipModelConfig",
    "ClipTask",
    "ClipTaskConfig",
    "evaluate_clip",
    "retrieval_metrics",
    "run",
    "zero_shot_category_accuracy",
]

logger = logging.getLogger(__name__)


@dataclass
class ClipDataConfig:
    """The image-text pairs (JSONL: ``{"image": "images/<file>", "text": "..."}``, paths relative to the file)."""

    root: str = cfg("garments/pretrain", "folder holding the split files (the garment world's pretrain/)")
    train_file: str = cfg("train.jsonl", "training pairs, relative to root")
    val_file: str | None = cfg(
        "val.jsonl", "held-out pairs for checkpoint selection (R@1 both ways), relative to root; null = none"
    )
    limit: int | None = cfg(None, "use only the first N training pairs (debugging)")
    batch_size: int = cfg(64, "pairs per batch per process (the in-batch negatives of the contrastive loss)")
    augment: bool = cfg(True, "random horizontal flip of training images (the only augmentation)")
    encode_batch_size: int = cfg(256, "images/texts per batch when preprocessing and validating")


@dataclass
class ClipModelConfig:
    """The architecture, or an exported CLIP folder to continue training from."""

    arch: ClipArchConfig = cfg(factory=ClipArchConfig, help="open_clip architecture (ignored with init_from)")
    init_from: str | None = cfg(
        None,
        "exported CLIP folder (kind clip) whose architecture and weights training starts from; null = random",
    )
    preprocess: str = cfg(
        "targetpad", "image padding before the model's resize: targetpad | squarepad | none"
    )
    train_token_embedding: bool = cfg(
        False,
        "train the 49,408-row token-embedding table (false: keep its random init, which the text transformer "
        "learns to read; each CPU step is cheaper by a dense AdamW update of 49,408 x width values)",
    )


@dataclass
class ClipLossConfig:
    """CLIP's symmetric InfoNCE with a learned temperature."""

    init_temperature: float = cfg(0.07, "initial temperature (CLIP: 0.07, i.e. logit scale 1/0.07)")
    max_logit_scale: float = cfg(100.0, "the learned logit scale is clamped at this value (CLIP: 100)")


@dataclass
class ClipEvalConfig:
    """Validation and export."""

    ks: list[int] = cfg(factory=lambda: [1, 5, 10], help="cut-offs of the validation recalls")
    export_dir: str | None = cfg(None, "exported CLIP folder; null = <trainer.output_dir>/model")


@dataclass
class ClipTaskConfig:
    """Config of ``capret-train`` task ``clip`` (see configs/garments_clip.yaml)."""

    task: str = cfg("clip", "task name; must be 'clip'")
    data: ClipDataConfig = cfg(factory=ClipDataConfig, help="image-text pairs")
    model: ClipModelConfig = cfg(factory=ClipModelConfig, help="architecture / starting weights")
    loss: ClipLossConfig = cfg(factory=ClipLossConfig, help="contrastive loss")
    trainer: TrainerConfig = cfg(
        factory=lambda: TrainerConfig(
            lr=1e-3, weight_decay=0.1, warmup_steps=50, betas=[0.9, 0.98], eps=1e-6, monitor="mean_recall@1"
        ),
        help="shared training loop (CLIP: AdamW, betas 0.9/0.98, eps 1e-6, wd 0.1, warmup + cosine)",
    )
    eval: ClipEvalConfig = cfg(factory=ClipEvalConfig, help="validation and export")


# ---------------------------------------------------------------------------------------------- metrics


def retrieval_metrics(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    *,
    texts: Sequence[str],
    images: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image-to-text and text-to-image R@k of paired embeddings (row ``i`` of each is pair ``i``).

    A pair's own text is relevant to its image and vice versa; so is any other pair with the *same* text (or the
    same image file), since nothing can tell identical strings apart. ``chance_recall@1`` is the R@1 of a random
    ranking (mean share of relevant candidates), to read the others against.
    """
    n = image_embeddings.shape[0]
    if text_embeddings.shape[0] != n or len(texts) != n:
        raise ValueError(f"{n} images, {text_embeddings.shape[0]} text embeddings, {len(texts)} texts")
    same_text = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.bool)
    relevant = same_text | torch.eye(n, dtype=torch.bool)
    if images is not None:
        relevant |= torch.tensor([[a == b for b in images] for a in images], dtype=torch.bool)
    scores = image_embeddings.float() @ text_embeddings.float().T
    i2t = recall_at_k(scores, relevant, ks)
    t2i = recall_at_k(scores.T, relevant.T, ks)
    out = {f"i2t_recall@{k}": float(v) for k, v in i2t.items()}
    out.update({f"t2i_recall@{k}": float(v) for k, v in t2i.items()})
    if 1 in i2t:
        out["mean_recall@1"] = (out["i2t_recall@1"] + out["t2i_recall@1"]) / 2
    out["chance_recall@1"] = float(relevant.float().mean(dim=1).mean())
    out["pairs"] = float(n)
    return out


@torch.no_grad()
def _embed_texts(clip: ClipBundle, texts: Sequence[str], *, batch_size: int) -> torch.Tensor:
    parts = [
        clip.encode_text(list(texts[i : i + batch_size])).float().cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(parts)


@torch.no_grad()
def _embed_pixels(clip: ClipBundle, pixels: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    parts = [
        clip.encode_image(pixels[i : i + batch_size].to(clip.device, torch.float32)).float().cpu()
        for i in range(0, pixels.shape[0], batch_size)
    ]
    return torch.cat(parts)


def _preprocess(clip: ClipBundle, pairs: Sequence[ImageTextPair]) -> torch.Tensor:
    """``[N, 3, S, S]`` float16 pixels of every pair's image, preprocessed exactly as the exported model will."""
    first = clip.transform(decode_image(pairs[0].image))
    out = torch.empty((len(pairs), *first.shape), dtype=torch.float16)
    cache: dict[Path, int] = {}
    for i, pair in enumerate(pairs):
        if pair.image in cache:  # the same file listed twice is decoded once
            out[i] = out[cache[pair.image]]
            continue
        cache[pair.image] = i
        out[i] = clip.transform(decode_image(pair.image)).to(torch.float16)
    return out


def evaluate_clip(
    folder: str | Path,
    split_jsonl: str | Path,
    *,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Held-out retrieval of an exported CLIP on a JSONL split: ``i2t_recall@k``, ``t2i_recall@k``,
    ``mean_recall@1``, ``chance_recall@1`` and ``pairs`` (see :func:`retrieval_metrics`)."""
    clip = load_clip_folder(folder, device=device)
    pairs = read_image_text_pairs(split_jsonl)
    pixels = _preprocess(clip, pairs)
    images = _embed_pixels(clip, pixels, batch_size=batch_size)
    texts = [p.text for p in pairs]
    return retrieval_metrics(
        images, _embed_texts(clip, texts, batch_size=batch_size), texts=texts,
        images=[str(p.image) for p in pairs], ks=ks,
    )  # fmt: skip


def zero_shot_category_accuracy(
    clip: ClipBundle | str | Path,
    images: Sequence[Image.Image],
    labels: Sequence[str],
    *,
    categories: Sequence[str] | None = None,
    boxes: Sequence[Box | None] | None = None,
    templates: Sequence[str] = ("{}",),
    batch_size: int = 128,
) -> dict[str, Any]:
    """Zero-shot category accuracy: each image (cropped to its box) gets the category whose prompt is closest.

    The prompts are the category names in ``templates`` (default: the bare name, as the garment world's
    alt-texts name a garment). ``labels`` are read only to score the predictions, after they are made.

    Args:
        clip: a CLIP bundle or an exported CLIP folder.
        images: the photos (PIL).
        labels: the true category name of each image (for scoring only).
        categories: the candidate names; default: the garment world's 13 DeepFashion2 categories.
        boxes: ``[x1, y1, x2, y2]`` per image to crop to first (None = whole image).
        templates: prompt patterns with one ``{}``; several are averaged (prompt ensembling).

    Returns:
        ``{"accuracy", "chance", "count", "per_category": {name: accuracy}, "predictions": [name, ...]}``;
        ``chance`` is ``1 / len(categories)``.
    """
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images for {len(labels)} labels")
    names = list(GARMENT_CATEGORIES if categories is None else categories)
    unknown = sorted({label for label in labels if label not in names})
    if unknown:
        raise DataError(f"labels {unknown} are not among the candidate categories {names}")
    bundle = load_clip_folder(clip) if isinstance(clip, str | Path) else clip
    with torch.no_grad():
        weights = class_embeddings(bundle, names, templates=templates)
        embedded = encode_pil_images(bundle, images, boxes=boxes, batch_size=batch_size)
        predicted = [names[i] for i in zero_shot_scores(embedded, weights).argmax(dim=1).tolist()]
    # scoring: the only place labels are read
    correct = [p == t for p, t in zip(predicted, labels)]
    per = {
        name: sum(c for c, t in zip(correct, labels) if t == name) / sum(t == name for t in labels)
        for name in names
        if any(t == name for t in labels)
    }
    return {
        "accuracy": sum(correct) / max(len(correct), 1),
        "chance": 1.0 / len(names),
        "count": len(correct),
        "per_category": per,
        "predictions": predicted,
    }


# ---------------------------------------------------------------------------------------------- the task


class ClipTrainModule(nn.Module):
    """The CLIP bundle plus the loss: ``forward(batch)`` returns the named terms, so one (DDP-wrapped) call
    covers both towers and the temperature."""

    def __init__(self, clip: ClipBundle, *, loss: ClipLossConfig, rank: int, world_size: int) -> None:
        super().__init__()
        from open_clip.loss import ClipLoss

        self.clip = clip
        self.max_log_scale = math.log(loss.max_logit_scale)
        self.loss = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world_size)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.clip(pixels=batch["pixels"].float(), input_ids=batch["input_ids"])
        image = F.normalize(out["image"].float(), dim=-1)
        text = F.normalize(out["text"].float(), dim=-1)
        log_scale = self.clip.model.logit_scale
        scale = log_scale.clamp(max=self.max_log_scale).exp()
        loss = self.loss(image, text, scale)
        return {"loss": loss, "logit_scale": scale.detach()}


class _Batches:
    """Index batches of one epoch with ``len()`` (the trainer derives steps per epoch from it)."""

    def __init__(self, batches: list[list[int]], make: Any) -> None:
        self.batches, self.make = batches, make

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for idx in self.batches:
            yield self.make(idx)


class ClipTask:
    """The :class:`capret.engine.trainer.TrainTask` of contrastive pretraining."""

    def __init__(self, config: ClipTaskConfig) -> None:
        if config.task != "clip":
            raise ConfigError(f"task={config.task!r}: this runner trains task 'clip'")
        self.config = config
        data = config.data
        root = Path(data.root)
        self.pairs = read_image_text_pairs(root / data.train_file, limit=data.limit)
        self.val_pairs = read_image_text_pairs(root / data.val_file) if data.val_file else []
        if len(self.pairs) < data.batch_size:
            raise ConfigError(
                f"{len(self.pairs)} training pairs in {root / data.train_file} cannot fill one batch of "
                f"data.batch_size={data.batch_size}"
            )
        self.arch = self._arch()
        self.dist = DistContext()
        self.clip: ClipBundle | None = None
        self._pixels: torch.Tensor | None = None
        self._tokens: torch.Tensor | None = None
        self._val: tuple[torch.Tensor, list[str]] | None = None

    def _arch(self) -> ClipArchConfig:
        init = self.config.model.init_from
        if init is None:
            return self.config.model.arch
        meta = read_clip_sidecar(init)
        return from_dict(ClipArchConfig, meta["config"]["arch"])

    def setup(self, dist: DistContext) -> None:
        """The trainer says where this process sits (the loss gathers features across ranks)."""
        self.dist = dist

    def build_model(self) -> nn.Module:
        model = build_open_clip(self.arch, seed=self.config.trainer.seed)
        clip = wrap_in_memory(model, self.arch, preprocess=self.config.model.preprocess)
        if self.config.model.init_from is not None:
            model.load_state_dict(load_safetensors(Path(self.config.model.init_from) / CLIP_WEIGHTS_FILE))
        else:
            scale: Any = model.logit_scale
            with torch.no_grad():
                scale.fill_(math.log(1.0 / self.config.loss.init_temperature))
        if not self.config.model.train_token_embedding:
            clip.token_embedding.weight.requires_grad_(False)
        self.clip = clip
        batch = self.config.data.encode_batch_size
        self._pixels = _preprocess(clip, self.pairs)
        self._tokens = torch.cat(
            [clip.tokenize([p.text for p in self.pairs[i : i + batch]])["input_ids"]
             for i in range(0, len(self.pairs), batch)]
        )  # fmt: skip
        if self.val_pairs:
            self._val = (_preprocess(clip, self.val_pairs), [p.text for p in self.val_pairs])
        return ClipTrainModule(
            clip, loss=self.config.loss, rank=self.dist.rank, world_size=self.dist.world_size
        )

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Weight decay on matrices only; gains, biases, embeddings and the temperature are not decayed."""
        decay: list[nn.Parameter] = []
        plain: list[nn.Parameter] = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            exempt = param.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith(".bias")
            (plain if exempt else decay).append(param)
        return [
            {"name": "decay", "params": decay},
            {"name": "no_decay", "params": plain, "weight_decay": 0.0},
        ]

    def train_dataloader(self, *, rank: int, world_size: int, epoch: int, seed: int) -> _Batches:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.pairs), generator=g)
        flips = torch.rand(len(self.pairs), generator=g) < 0.5
        bs = self.config.data.batch_size
        per_rank = len(order) // world_size // bs * bs
        if per_rank == 0:
            raise ConfigError(
                f"{len(order)} pairs cannot fill a batch of {bs} on each of {world_size} process(es); lower "
                "data.batch_size"
            )
        mine = order[rank::world_size][:per_rank].tolist()
        batches = [mine[i : i + bs] for i in range(0, per_rank, bs)]
        augment = self.config.data.augment

        def make(idx: list[int]) -> dict[str, torch.Tensor]:
            assert self._pixels is not None and self._tokens is not None
            pixels = self._pixels[idx]
            if augment:
                flip = flips[idx]
                pixels[flip] = pixels[flip].flip(-1)
            return {"pixels": pixels, "input_ids": self._tokens[idx]}

        return _Batches(batches, make)

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model(batch)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Image-to-text and text-to-image R@k on the held-out pairs (empty without ``data.val_file``)."""
        if self._val is None:
            return {}
        clip = unwrap_model(model).clip
        assert isinstance(clip, ClipBundle)
        pixels, texts = self._val
        batch = self.config.data.encode_batch_size
        return retrieval_metrics(
            _embed_pixels(clip, pixels, batch_size=batch), _embed_texts(clip, texts, batch_size=batch),
            texts=texts, images=[str(p.image) for p in self.val_pairs], ks=self.config.eval.ks,
        )  # fmt: skip

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.config)


def run(config: ClipTaskConfig, *, resume: str | None = None) -> dict[str, Any]:
    """Train, then export the selected (best held-out, else last) weights as a ``kind: clip`` folder."""
    check_task_name(config, "clip")
    task = ClipTask(config)

    def export(result: dict[str, Any], folder: Path) -> dict[str, Any]:
        assert task.clip is not None
        checkpoint = result.get("best_checkpoint") or result.get("last_checkpoint")
        module = ClipTrainModule(task.clip, loss=config.loss, rank=0, world_size=1)
        if checkpoint:
            load_model_weights(module, checkpoint)
        held_out = task.evaluate(module.eval()) if task._val is not None else {}
        write_clip_folder(
            folder,
            model=task.clip.model,
            arch=task.arch,
            sidecar={
                "trained_from": {"task": "clip", "checkpoint": checkpoint, "config": task.config_dict()},
                "metrics": {"held_out": held_out, "split": config.data.val_file},
                "git_revision": git_revision(),
                "packages": package_versions(),
            },
        )
        logger.info("exported CLIP to %s (held-out %s)", folder, held_out)
        return {"held_out": held_out, "train_pairs": len(task.pairs)}

    return train_and_export(
        task, config.trainer, resume=resume, export=export, export_dir=config.eval.export_dir
    )


register_task("clip", ClipTaskConfig, run)
