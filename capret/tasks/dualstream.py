"""Task ``dualstream``: train the caption-augmented dual-stream model on DeepFashion2-layout data.

``capret-train --config configs/deepfashion2_dualstream.yaml [key=value ...]`` builds a
:class:`DualStreamConfig` and calls :func:`run`, which hands a :class:`DualStreamTask` to the shared training
loop (``capret.engine.trainer.train``).

Losses (all weights configurable, every term logged):

* **ArcFace** (Deng et al., CVPR 2019) over item identities ``(pair_id, style)`` on the fused embedding, from
  pytorch-metric-learning (``ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64)``; its class-centre
  matrix gets its own parameter group and learning rate, as PML requires);
* **ITC**: symmetric InfoNCE between the visual-only and caption-only embeddings with a learnable clamped
  temperature (X-VLM), on the samples that have a caption;
* **box**: L1 + (1 - GIoU) between the predicted and the annotated item box (X-VLM's bounding-box loss). The
  head is text-conditioned, so only samples whose caption is present (not missing, not dropped) contribute; in
  ``model.mode: full`` it localises the captioned item in the whole image, in ``crop`` mode inside its crop.

ITC is identity-aware: the batch's identity labels are its ids, so the K items of an identity (and the
sampler's repeats) are positives of one another, never negatives.

Model selection never sees the reported split: ``data.holdout_identities`` (default 5%) of the train split's
identities are held out of training, and validation during training (``evaluate``: the ground-truth-box
protocol, mAP and R@k with the captions (``map``, the monitored metric) and without them
(``map_no_captions``), and the text-conditioned box head's grounding quality on the captioned items
(``box_miou``, ``box_iou@0.5``)) runs on them. After training, a self-contained model folder is exported
(``trainer.output_dir/model`` by default) with the selected weights, and the reported split
(``data.val_split``) is evaluated exactly once with it: ``final_metrics`` in the result and
``<output_dir>/final_metrics.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from capret.config import cfg, to_dict
from capret.data.caption_records import caption_sources
from capret.data.captions import join_captions, split_fingerprint
from capret.data.items import (
    ItemCollator,
    ItemDataset,
    PKBatchSampler,
    identity_labels,
    split_holdout_identities,
)
from capret.engine.distributed import DistContext
from capret.engine.trainer import TrainerConfig
from capret.errors import DataError
from capret.inference.dualstream.encoding import (
    box_quality,
    evaluate_items,
    item_transform,
    load_dual_stream_weights,
    predict_item_boxes,
)
from capret.io import atomic_write_json
from capret.losses.gather import all_gather_sizes
from capret.models.dual_stream import DualStreamModel, DualStreamModelConfig, create_dual_stream_model
from capret.tasks.registry import register_task
from capret.tasks.train_export import SplitsConfig, selected_weights, train_and_export

__all__ = [
    "DataConfig",
    "DualStreamConfig",
    "DualStreamTask",
    "EvalConfig",
    "LossConfig",
    "TrainModule",
    "protocol_metrics",
    "run",
]

logger = logging.getLogger(__name__)


@dataclass
class DataConfig(SplitsConfig):
    """Where the items and captions are and how batches are drawn. ``val_split`` is never used for selection:
    checkpoints are selected on held-out train identities (``holdout_identities``)."""

    holdout_identities: float = cfg(
        0.05,
        "share of the train split's identities held out of training for validation and checkpoint selection; "
        "0 = no validation during training (the last weights are exported)",
    )
    captions: str | None = cfg(None, "caption store JSONL of the train split (keys = Item.key); null = none")
    val_captions: str | None = cfg(
        None,
        "caption store JSONL of the validation split; null = validate without captions. A separate store because "
        "DeepFashion2 image ids restart at 1 in every split, so Item.key values collide across splits",
    )
    min_caption_coverage: float = cfg(
        0.5,
        "smallest fraction of items a caption store must cover; below it training/validation stops (a store of "
        "another split or dataset would otherwise silently leave most items on the no-caption path)",
    )
    on_bad_image: str = cfg(
        "error",
        "error: an unreadable image stops the run naming the file; skip: its item is left out and listed in "
        "<output_dir>/bad_images.json",
    )
    decode: str = cfg(
        "pil",
        "photo decoder of the training loader: pil (reference); torchvision (decode_jpeg, pixels identical to "
        "pil); reduced (JPEG DCT-domain 1/2-1/8 decoding when the crop allows; not pixel-identical, see "
        "docs/performance.md)",
    )
    p: int = cfg(16, "identities per batch (P of the P x K sampler)")
    k: int = cfg(4, "items per identity per batch (K), alternating shop and user items")
    caption_dropout: float = cfg(0.3, "probability of hiding a training sample's caption (no-caption path)")
    augment: bool = cfg(True, "training augmentations (scale/translation jitter, flip, colour jitter)")
    max_items: int | None = cfg(None, "use only the first N training items (debugging)")


@dataclass
class LossConfig:
    """Loss weights and the ArcFace head."""

    arcface_weight: float = cfg(1.0, "weight of the ArcFace identity loss")
    arcface_margin: float = cfg(28.6, "ArcFace angular margin in degrees (PML default 28.6 = 0.5 rad)")
    arcface_scale: float = cfg(64.0, "ArcFace logit scale")
    arcface_lr: float = cfg(1e-2, "learning rate of the ArcFace class centres (own parameter group)")
    itc_weight: float = cfg(0.5, "weight of the image-caption contrastive loss")
    itc_temperature: float = cfg(0.07, "initial ITC temperature (learnable, clamped to [0.001, 0.5])")
    box_weight: float = cfg(0.5, "weight of the box loss (L1 + GIoU)")
    box_l1_weight: float = cfg(1.0, "weight of the L1 term inside the box loss")
    box_giou_weight: float = cfg(1.0, "weight of the 1 - GIoU term inside the box loss")


@dataclass
class EvalConfig:
    """Validation during and after training."""

    ks: list[int] = cfg(factory=lambda: [1, 5, 10, 20], help="cut-offs of R@k")
    batch_size: int = cfg(64, "feature-extraction batch size")
    no_captions: bool = cfg(True, "also evaluate the image-only path (map_no_captions)")
    export_dir: str | None = cfg(None, "model folder written after training; null = <output_dir>/model")


@dataclass
class DualStreamConfig:
    """Everything ``capret-train`` needs for task ``dualstream``."""

    task: str = cfg("dualstream", "task name (fixed)")
    data: DataConfig = cfg(factory=DataConfig, help="data")
    model: DualStreamModelConfig = cfg(factory=DualStreamModelConfig, help="model architecture")
    loss: LossConfig = cfg(factory=LossConfig, help="losses")
    trainer: TrainerConfig = cfg(factory=TrainerConfig, help="training loop (shared trainer)")
    eval: EvalConfig = cfg(factory=EvalConfig, help="validation")


class TrainModule(nn.Module):
    """The dual-stream model plus the loss heads that own parameters (ArcFace centres, ITC temperature).

    ``forward(batch)`` returns the named loss terms, so the training step is one call of the (DDP-wrapped)
    module and gradient synchronisation covers the heads too.
    """

    def __init__(
        self,
        model: DualStreamModel,
        *,
        num_classes: int,
        loss: LossConfig,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        from pytorch_metric_learning.losses import ArcFaceLoss

        from capret.losses import create_loss

        self.model = model
        self.loss_config = loss
        self.world_size = world_size
        self.arcface = ArcFaceLoss(
            num_classes=num_classes,
            embedding_size=model.embed_dim,
            margin=loss.arcface_margin,
            scale=loss.arcface_scale,
        )
        # Heads are only built for terms that are on, so a switched-off term costs nothing and owns no weights.
        # ITC and box come from the loss registry (capret.losses); ArcFace from pytorch-metric-learning.
        self.itc = (
            create_loss("itc", init_temperature=loss.itc_temperature, rank=rank, world_size=world_size)
            if loss.itc_weight > 0
            else None
        )
        self.box = (
            create_loss("box", l1_weight=loss.box_l1_weight, giou_weight=loss.box_giou_weight)
            if loss.box_weight > 0
            else None
        )

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.model(
            batch["pixels"], batch["input_ids"], batch["attention_mask"], has_caption=batch["has_caption"]
        )
        cfg_ = self.loss_config
        # ArcFace in fp32: PML's ArcFace produces NaNs under fp16 autocast (ANCHORS.md).
        with torch.autocast(device_type=out.embedding.device.type, enabled=False):
            arcface = self.arcface(out.embedding.float(), batch["label"])
        terms: dict[str, Tensor] = {"arcface": arcface}
        total = cfg_.arcface_weight * arcface
        captioned = out.has_caption
        # Under DDP every rank must enter the ITC loss (it gathers across ranks), even with no local caption.
        if (
            self.itc is not None
            and out.text_embedding is not None
            and (self.world_size > 1 or captioned.any())
        ):
            itc = self.itc(
                out.image_embedding[captioned].float(),
                out.text_embedding[captioned].float(),
                ids=batch["label"][captioned],
            )
            terms["itc"] = itc["loss"]
            terms["itc_temperature"] = itc["temperature"].detach()
            total = total + cfg_.itc_weight * itc["loss"]
        elif (
            self.itc is not None
        ):  # no captioned sample in this batch: a zero term keeps the log columns stable
            zero = out.image_embedding.sum() * 0.0 + sum(p.sum() * 0.0 for p in self.itc.parameters())
            terms["itc"] = zero
            total = total + zero
        if self.box is not None:
            # text-conditioned localisation: no target without the caption that names the item
            box = self.box(out.box.float(), batch["box"].float(), mask=captioned)
            scale = self._box_rank_scale(captioned)
            for name, value in box.items():
                terms["box" if name == "loss" else f"box_{name}"] = value * scale
            total = total + cfg_.box_weight * box["loss"] * scale
        terms["loss"] = total
        return terms

    def _box_rank_scale(self, captioned: Tensor) -> float:
        """``local * world_size / global`` captioned count: the box loss is a mean over the captioned samples, and
        ranks hold different numbers of them, so this factor makes DDP's average over ranks (and the logged mean)
        the mean over the global batch, as for ITC. 1 on a single process."""
        world = int(self.world_size)
        if world == 1:
            return 1.0
        local = int(captioned.sum())
        sizes = all_gather_sizes(local, world_size=world, device=captioned.device)
        return local * world / sum(sizes) if sum(sizes) else 0.0


class DualStreamTask:
    """The :class:`~capret.engine.trainer.TrainTask` of the dual-stream model."""

    def __init__(self, config: DualStreamConfig) -> None:
        from capret.data import create_dataset

        self.config = config
        data = config.data
        every = create_dataset("deepfashion2", root=data.root, split=data.train_split, progress=False)
        items = [it for it in every if it.style > 0]
        if data.max_items is not None:
            items = items[: data.max_items]
        if not items:
            raise DataError(f"{data.root}/{data.train_split}: no items with style > 0 to train on")
        items, self.holdout_items = split_holdout_identities(
            items, fraction=data.holdout_identities, seed=config.trainer.seed
        )
        self.items = items
        self.labels, self.identities = identity_labels(items)
        self.bad_images: list[str] = []
        self.caption_join = join_captions(
            items,
            data.captions,
            split=data.train_split,
            fingerprint=split_fingerprint(every) if data.captions is not None else None,
            min_coverage=data.min_caption_coverage,
        )
        if data.captions is not None:
            logger.info(
                "captions: %d found, %d missing of %d train items",
                self.caption_join.found,
                self.caption_join.missing,
                len(items),
            )
        self._model: DualStreamModel | None = None
        self._dataset: ItemDataset | None = None
        self.dist = DistContext()  # replaced by the trainer's ``setup`` call

    # ------------------------------------------------------------------------------------------ trainer API
    def setup(self, dist: DistContext) -> None:
        """The trainer tells the task where it sits in the job (ITC gathers across ranks with it)."""
        self.dist = dist

    def build_model(self) -> nn.Module:
        model = create_dual_stream_model(self.config.model)
        self._model = model
        return TrainModule(
            model,
            num_classes=len(self.identities),
            loss=self.config.loss,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        module = _unwrap(model)
        head = list(module.arcface.parameters())
        head_ids = {id(p) for p in head}
        rest = [p for p in module.parameters() if p.requires_grad and id(p) not in head_ids]
        return [
            {"name": "model", "params": rest},
            {"name": "arcface", "params": head, "lr": self.config.loss.arcface_lr, "weight_decay": 0.0},
        ]

    def _train_dataset(self) -> ItemDataset:
        if self._dataset is None:
            if self._model is None:
                raise RuntimeError("build_model() must run before train_dataloader()")
            transform = item_transform(self._model, augment=self.config.data.augment)
            self._dataset = ItemDataset(
                root=self.config.data.root,
                split=self.config.data.train_split,
                items=self.items,
                labels=self.labels,
                transform=transform,
                captions=self.caption_join.captions,
                caption_dropout=self.config.data.caption_dropout,
                on_bad_image=self.config.data.on_bad_image,
                decode=self.config.data.decode,
            )
        return self._dataset

    def train_dataloader(
        self, *, rank: int, world_size: int, epoch: int, seed: int
    ) -> torch.utils.data.DataLoader:
        dataset = self._train_dataset()
        sampler = PKBatchSampler(
            dataset.labels,
            [it.source for it in dataset.items],
            p=self.config.data.p,
            k=self.config.data.k,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
        )
        assert self._model is not None
        workers = self.config.trainer.num_workers
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=ItemCollator(self._model.tokenize),
            num_workers=workers,
            # the trainer moves batches with non_blocking=True: from pinned pages that copy is asynchronous
            pin_memory=self.dist.device.type == "cuda",
            # keeps the worker processes (and their imported modules) for the whole epoch's iterator, which
            # matters when the trainer re-iterates a loader; each epoch still builds its own sampler
            persistent_workers=workers > 0,
        )

    def training_step(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        bad = batch.pop("bad_images", None)
        if bad:
            self._record_bad_images(bad)  # type: ignore[arg-type]
        return model(batch)

    def _record_bad_images(self, files: list[str]) -> None:
        """Under ``data.on_bad_image: skip``: keep every skipped file and its count in
        ``<output_dir>/bad_images.json`` (rewritten atomically when a new one appears)."""
        new = [f for f in files if f not in self.bad_images]
        if not new:
            return
        self.bad_images.extend(new)
        logger.warning("skipped unreadable image(s): %s", ", ".join(new))
        atomic_write_json(
            Path(self.config.trainer.output_dir) / "bad_images.json",
            {"count": len(self.bad_images), "files": self.bad_images},
            indent=2,
        )

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Model-selection metrics on the held-out *train* identities (empty without a holdout)."""
        if not self.holdout_items:
            return {}
        data = self.config.data
        return protocol_metrics(
            _unwrap(model).model,
            data=data,
            eval_config=self.config.eval,
            split=data.train_split,
            items=self.holdout_items,
            captions=data.captions,
        )

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.config)


def run(config: DualStreamConfig, *, resume: str | None = None) -> dict[str, Any]:
    """Train, then export the best (or last) weights as a self-contained model folder."""
    task = DualStreamTask(config)

    def export(result: dict[str, Any], folder: Path) -> dict[str, Any]:
        model = task._model if task._model is not None else create_dual_stream_model(config.model)
        selected_weights(model, result, load=load_dual_stream_weights).save_pretrained(folder)
        extra = {**task.caption_join.summary(), "holdout_items": len(task.holdout_items),
                 "selection": "holdout train identities"}  # fmt: skip
        if config.data.captions is not None:  # pixels or oracle: every report says which captions it rests on
            extra["caption_source"] = caption_sources(config.data.captions)
        if config.data.val_split:
            # The one evaluation of the reported split, after selection is over.
            reported = protocol_metrics(
                model.eval(),
                data=config.data,
                eval_config=config.eval,
                split=config.data.val_split,
                items=None,
                captions=config.data.val_captions,
            )
            final = {"split": config.data.val_split, **reported}
            atomic_write_json(Path(config.trainer.output_dir) / "final_metrics.json", final, indent=2)
            extra["final_metrics"] = final
        return extra

    return train_and_export(
        task, config.trainer, resume=resume, export=export, export_dir=config.eval.export_dir
    )


def protocol_metrics(
    model: DualStreamModel,
    *,
    data: DataConfig,
    eval_config: EvalConfig,
    split: str,
    items: list[Any] | None,
    captions: str | None,
) -> dict[str, float]:
    """Ground-truth-box mAP / R@k with captions and (``eval.no_captions``) without them (``*_no_captions``).

    ``data`` gives the dataset root and the run's caption-coverage and bad-image rules, the same for the holdout
    (selection) and the reported split; ``split``, ``items`` and ``captions`` say which of them is scored.
    """
    root, min_caption_coverage, on_bad_image = data.root, data.min_caption_coverage, data.on_bad_image
    device = next(model.parameters()).device
    common = {"root": root, "split": split, "items": items, "ks": eval_config.ks,
              "batch_size": eval_config.batch_size, "device": device,
              "on_bad_image": on_bad_image}  # fmt: skip
    with_captions = evaluate_items(
        model,
        captions=captions,
        min_caption_coverage=min_caption_coverage,
        **common,  # type: ignore[arg-type]
    )
    metrics = {k: float(v) for k, v in with_captions.metrics.items() if isinstance(v, int | float)}
    if eval_config.no_captions and captions is not None:
        without = evaluate_items(model, captions=None, **common)  # type: ignore[arg-type]
        for key, value in without.metrics.items():
            if isinstance(value, int | float) and (key in ("map", "map_at_r") or key.startswith("recall@")):
                metrics[f"{key}_no_captions"] = float(value)
    if captions is not None:  # grounding: the box the caption points to, on the protocol's captioned items
        scored = [*with_captions.query_items, *with_captions.gallery_items]
        pred, target = predict_item_boxes(
            model,
            root=root,
            split=split,
            items=scored,
            captions=join_captions(scored, captions).captions,
            batch_size=eval_config.batch_size,
            device=device,
        )
        metrics.update(box_quality(pred, target))
    return metrics


def _unwrap(model: nn.Module) -> TrainModule:
    """The :class:`TrainModule` inside a DDP wrapper (or the module itself)."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, TrainModule):
        raise TypeError(f"expected the dual-stream TrainModule, got {type(inner).__name__}")
    return inner


register_task("dualstream", DualStreamConfig, run)
