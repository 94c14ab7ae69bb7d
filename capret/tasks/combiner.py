"""Training task ``combiner``: the two stages of CLIP4Cir (Baldrati et al., CVPR-W 2022 / TOMM 2023).

* **Stage 1** fine-tunes CLIP's text encoder (``model.encoder: text``; ``image`` or ``both`` also tune the image
  tower) with the batch-based classification loss: query ``i`` = ``normalize(img_i + txt_i)`` must pick
  target ``i`` among the batch's targets, logits ``100 · query @ normalize(targets).T``; AdamW, lr 2e-6.
* **Stage 2** freezes CLIP and trains the Combiner with the same loss; Adam, lr 2e-5. Since CLIP is frozen,
  every image (and caption) feature is computed once into a feature cache (:mod:`capret.inference.cir.features`)
  and each epoch is a few small MLP steps. Stage 2 starts from the stage-1 weights (``model.stage1_checkpoint``).
  Stage 1 with the image tower frozen (the default) caches image features the same way.

Model selection follows the paper: FashionIQ by the average of R@10 and R@50 over the categories
(``trainer.monitor: average``), CIRR by the mean of R@5 and Recall_subset@1 (``trainer.monitor:
r5_rs1_mean``), computed by the same :func:`capret.inference.cir.benchmarks.evaluate_cir` as ``capret-eval``.
The shared loop (:mod:`capret.engine.trainer`) does optimisation, logging and checkpoints; after training the
stage is exported as a ``combiner`` model folder (``<output_dir>/stage<N>/model``, with the fine-tuned CLIP's
weights when they are not the pretrained ones) that :func:`capret.load` and ``capret-eval --checkpoint`` open.

Adam vs AdamW: the trainer's ``adamw`` with ``weight_decay: 0`` *is* Adam, so the stage sections set each
stage's learning rate and weight decay as parameter-group values and one ``trainer.optimizer`` serves both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from capret.config import ConfigError, cfg, to_dict
from capret.data import create_dataset
from capret.data.imagefile import check_bad_image_policy, find_bad_images
from capret.engine.distributed import DistContext
from capret.engine.trainer import TrainerConfig, unwrap_model
from capret.inference.cir.benchmarks import evaluate_cir, open_benchmark
from capret.inference.cir.combiner import load_combiner_clip, save_combiner_folder
from capret.inference.cir.features import CachedFeatures, image_features, text_features
from capret.inference.cir.methods import FuserMethod
from capret.inference.cir.search import FeatureOptions
from capret.io import atomic_write_json
from capret.models.clip import ClipBundle, TaskClipConfig
from capret.models.combiner import (
    LOGIT_SCALE,
    CombinerModelConfig,
    CombinerNetConfig,
    CombinerRecord,
    batch_classification_loss,
    build_fuser,
    upgrade_config_dict,
)
from capret.tasks.registry import register_task
from capret.tasks.train_export import check_task_name, selected_weights, train_and_export

logger = logging.getLogger(__name__)

__all__ = [
    "ClipConfig",
    "CombinerNetConfig",
    "CombinerTask",
    "CombinerTaskConfig",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "StageConfig",
    "build_fuser",
    "load_task_clip",
    "run",
    "upgrade_config_dict",
]


@dataclass
class StageConfig:
    """Per-stage optimisation settings (one YAML serves both stages; ``stage=`` picks the section)."""

    lr: float = cfg(2e-6, "learning rate of this stage (CLIP4Cir: 2e-6 stage 1, 2e-5 stage 2)")
    weight_decay: float = cfg(0.01, "weight decay (0 makes trainer.optimizer=adamw exactly Adam)")
    batch_size: int = cfg(32, "triplets per batch per process (the in-batch negatives of the loss)")
    epochs: int | None = cfg(None, "if set, train this many epochs (overrides trainer.max_steps/epochs)")
    eval_every: int | None = cfg(None, "if set, steps between validations (overrides trainer.eval_every)")


@dataclass
class DataConfig:
    """Which benchmark the triplets come from, and where CLIP features are cached."""

    dataset: Literal["fashioniq", "cirr"] = cfg("fashioniq", "training dataset: fashioniq | cirr")
    root: str = cfg("data/fashioniq", "dataset root in the official layout")
    categories: list[str] = cfg(
        factory=lambda: ["dress", "shirt", "toptee"], help="FashionIQ categories used for training/validation"
    )
    train_split: str = cfg("train", "split the model is trained on")
    val_split: str = cfg("val", "split used for model selection")
    feature_cache: str | None = cfg(
        "auto",
        "folder of cached CLIP features (what stage 2 trains on); 'auto' = <trainer.output_dir>/feature_cache; "
        "null = off",
    )
    encode_batch_size: int = cfg(64, "images per batch when encoding features (caches, validation galleries)")
    on_bad_image: str = cfg(
        "error",
        "error: an unreadable training image stops the run naming the file; skip: the training triplets whose "
        "reference or target cannot be read are dropped and listed in <trainer.output_dir>/bad_images.json",
    )


#: the ``model.clip`` section (CLIP + its preprocessing), shared with the zero-shot tasks
ClipConfig = TaskClipConfig


#: the ``model`` section: CLIP, Combiner sizes, tuned towers, stage-1 start (:mod:`capret.models.combiner`)
ModelConfig = CombinerModelConfig


@dataclass
class LossConfig:
    """The batch-based classification loss of both stages."""

    logit_scale: float = cfg(LOGIT_SCALE, "fixed logit scale of the loss (CLIP4Cir: 100)")


@dataclass
class CombinerTaskConfig:
    """Config of ``capret-train`` task ``combiner`` (see configs/fashioniq_combiner.yaml).

    ``stage`` and ``model`` are what the exported model folder records (:class:`capret.models.combiner.
    CombinerRecord`). Same shape as every task (``data``, ``model``, ``loss``, ``trainer``); ``stage`` and the per-stage
    optimisation sections ``stage1`` / ``stage2`` are this task's own.
    """

    task: str = cfg("combiner", "task name; must be 'combiner'")
    stage: int = cfg(1, "1: fine-tune CLIP with element-wise sum; 2: train the Combiner on frozen CLIP")
    data: DataConfig = cfg(factory=DataConfig, help="benchmark, splits and feature cache")
    model: ModelConfig = cfg(factory=ModelConfig, help="CLIP and Combiner")
    loss: LossConfig = cfg(factory=LossConfig, help="loss")
    stage1: StageConfig = cfg(factory=StageConfig, help="stage-1 optimisation")
    stage2: StageConfig = cfg(
        factory=lambda: StageConfig(lr=2e-5, weight_decay=0.0, batch_size=4096),
        help="stage-2 optimisation",
    )
    trainer: TrainerConfig = cfg(factory=TrainerConfig, help="shared training loop settings")


@dataclass(frozen=True)
class _Triplet:
    reference: str
    target: str
    texts: tuple[str, ...]  # caption variants; one is drawn per sample and epoch


def load_task_clip(config: CombinerTaskConfig, *, device: str | torch.device = "cpu") -> ClipBundle:
    """CLIP with this config's preprocessing; in stage 2, with the stage-1 fine-tuned weights loaded."""
    return load_combiner_clip(config, output_dir=config.trainer.output_dir, device=device)


class _TripletImages(Dataset):
    """Preprocessed (reference, target) pixels of triplets (stage 1 with a trainable image tower)."""

    def __init__(self, triplets: list[_Triplet], load: Callable[[str], Any], transform: Callable) -> None:
        self.triplets, self.load, self.transform = triplets, load, transform

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        t = self.triplets[i]
        return self.transform(self.load(t.reference)), self.transform(self.load(t.target)), i


class _SizedBatches:
    """An iterable of batches with ``len()`` (the trainer derives steps per epoch from it)."""

    def __init__(self, count: int, make: Callable[[], Iterator[dict[str, Any]]]) -> None:
        self.count, self.make = count, make

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.make()


class CombinerTask:
    """The :class:`capret.engine.trainer.TrainTask` of both CLIP4Cir stages."""

    def __init__(self, config: CombinerTaskConfig) -> None:
        if config.stage not in (1, 2):
            raise ConfigError(f"stage={config.stage} is not valid; choose 1 or 2")
        self.config = config
        self.stage_config = config.stage1 if config.stage == 1 else config.stage2
        self.triplets, self.load_image = self._train_triplets()
        self.bad_images: list[dict[str, str]] = []
        if check_bad_image_policy(config.data.on_bad_image) == "skip":
            self._drop_unreadable_triplets()
        self.clip: ClipBundle | None = None
        self.fuser: nn.Module | None = None
        self._image_cache: CachedFeatures | None = None
        self._text_cache: CachedFeatures | None = None
        self._image_fp: str | None = None
        self._text_fp: str | None = None
        self.dist = DistContext()  # replaced by the trainer's ``setup`` call

    def setup(self, dist: DistContext) -> None:
        """The trainer tells the task where it sits in the job (only the main process exports)."""
        self.dist = dist

    # ----------------------------------------------------------------------------------------- data
    def _datasets(self, split: str) -> list[Any]:
        """The split's readers, built by the dataset registry: one per FashionIQ category, or one CIRR split."""
        data = self.config.data
        if data.dataset == "fashioniq":
            return [
                create_dataset("fashioniq", root=data.root, split=split, category=c, caption_mode="eval")
                for c in data.categories
            ]
        return [create_dataset(data.dataset, root=data.root, split=split)]

    def _train_triplets(self) -> tuple[list[_Triplet], Callable[[str], Any]]:
        from capret.data.fashioniq import PAIRINGS, pair_captions

        datasets = self._datasets(self.config.data.train_split)
        if self.config.data.dataset == "fashioniq":
            triplets = [
                _Triplet(t.reference, t.target, tuple(pair_captions(t.captions, p) for p in PAIRINGS))  # type: ignore[arg-type]
                for ds in datasets
                for t in ds.triplets
            ]
            self._image_path = datasets[0].image_path
            return triplets, datasets[0].load_image
        ds = datasets[0]
        self._image_path = ds.image_path
        return [_Triplet(t.reference, t.target, (t.caption,)) for t in ds.triplets], ds.load_image  # type: ignore[arg-type]

    def _drop_unreadable_triplets(self) -> None:
        """``on_bad_image: skip``: decode every training image once, drop the triplets that name an unreadable
        one, and list the files in ``<trainer.output_dir>/bad_images.json`` (a stage-2 feature cache would
        otherwise fail half-way, and a stage-1 batch would fail at a random step)."""
        names = list(dict.fromkeys(n for t in self.triplets for n in (t.reference, t.target)))
        paths = [self._image_path(n) for n in names]
        bad = find_bad_images(paths, progress=False)
        if not bad:
            return
        reasons = {str(path): reason for path, reason in bad}
        unreadable = {n for n, p in zip(names, paths) if str(p) in reasons}
        before = len(self.triplets)
        self.triplets = [
            t for t in self.triplets if t.reference not in unreadable and t.target not in unreadable
        ]
        self.bad_images = [{"file": file, "reason": reason} for file, reason in reasons.items()]
        logger.warning(
            "skipped %d unreadable image(s), %d of %d training triplets", len(bad), before - len(self.triplets),
            before,
        )  # fmt: skip
        atomic_write_json(
            Path(self.config.trainer.output_dir) / "bad_images.json",
            {"count": len(self.bad_images), "dropped_triplets": before - len(self.triplets),
             "files": self.bad_images},
            indent=2,
        )  # fmt: skip

    @property
    def _cache_dir(self) -> Path | None:
        value = self.config.data.feature_cache
        if value is None:
            return None
        return Path(self.config.trainer.output_dir) / "feature_cache" if value == "auto" else Path(value)

    @property
    def _images_frozen(self) -> bool:
        return self.config.stage == 2 or self.config.model.encoder == "text"

    def epoch_batches(
        self, *, rank: int, world_size: int, epoch: int, seed: int
    ) -> tuple[list[list[int]], list[int]]:
        """Shuffled index batches of this rank (equal count on every rank) and each triplet's caption draw."""
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(self.triplets), generator=g).tolist()
        draws = torch.randint(0, 2**30, (len(self.triplets),), generator=g).tolist()
        variant = [d % len(t.texts) for d, t in zip(draws, self.triplets)]
        bs = self.stage_config.batch_size
        per_rank = len(order) // world_size // bs * bs
        if per_rank == 0:
            raise ConfigError(
                f"{len(order)} training triplets cannot fill one batch of {bs} on each of {world_size} "
                f"process(es); lower stage{self.config.stage}.batch_size"
            )
        mine = order[rank::world_size][:per_rank]
        return [mine[i : i + bs] for i in range(0, per_rank, bs)], variant

    def _ensure_caches(self) -> None:
        assert self.clip is not None and self.fuser is not None
        if self.config.stage == 2:
            # the trainer moved the Combiner to its device; the frozen CLIP follows it
            device = next(self.fuser.parameters()).device
            self.clip.to(device)
        cache = self._cache_dir
        if self._images_frozen and self._image_cache is None:
            self._image_fp = self.clip.image_fingerprint()
            names = [n for t in self.triplets for n in (t.reference, t.target)]
            self._image_cache = image_features(
                self.clip,
                names,
                load_image=self.load_image,
                cache_dir=cache,
                fingerprint=self._image_fp,
                batch_size=self.config.data.encode_batch_size,
                num_workers=self.config.trainer.num_workers,
            )
        if self.config.stage == 2 and self._text_cache is None:
            self._text_fp = self.clip.text_fingerprint()
            texts = [s for t in self.triplets for s in t.texts]
            self._text_cache = text_features(self.clip, texts, cache_dir=cache, fingerprint=self._text_fp)

    def train_dataloader(self, *, rank: int, world_size: int, epoch: int, seed: int) -> _SizedBatches:
        """Deterministic batches for ``(rank, world_size, epoch, seed)`` as the trainer requires.

        Frozen image tower: batches of cached features (no image is opened after the first epoch's cache).
        Trainable image tower: a DataLoader over preprocessed pixels.
        """
        self._ensure_caches()
        batches, variant = self.epoch_batches(rank=rank, world_size=world_size, epoch=epoch, seed=seed)
        if self._images_frozen:
            return _SizedBatches(len(batches), lambda: self._feature_batches(batches, variant))
        assert self.clip is not None
        loader = DataLoader(
            _TripletImages(self.triplets, self.load_image, self.clip.transform),
            batch_sampler=batches,
            num_workers=self.config.trainer.num_workers,
        )
        return _SizedBatches(len(batches), lambda: self._pixel_batches(loader, variant))

    def _texts(self, indices: list[int], variant: list[int]) -> list[str]:
        return [self.triplets[i].texts[variant[i]] for i in indices]

    def _tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        assert self.clip is not None
        return self.clip.tokenize(texts)

    def _feature_batches(self, batches: list[list[int]], variant: list[int]) -> Iterator[dict[str, Any]]:
        assert self._image_cache is not None
        for idx in batches:
            batch: dict[str, Any] = {
                "reference": self._image_cache.lookup([self.triplets[i].reference for i in idx]),
                "target": self._image_cache.lookup([self.triplets[i].target for i in idx]),
            }
            texts = self._texts(idx, variant)
            if self.config.stage == 2:
                assert self._text_cache is not None
                batch["text"] = self._text_cache.lookup(texts)
            else:
                batch.update(self._tokens(texts))
            yield batch

    def _pixel_batches(self, loader: DataLoader, variant: list[int]) -> Iterator[dict[str, Any]]:
        for ref, tgt, idx in loader:
            yield {
                "reference_pixels": ref,
                "target_pixels": tgt,
                **self._tokens(self._texts(idx.tolist(), variant)),
            }

    # ----------------------------------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        """Stage 1: the CLIP bundle (towers frozen/unfrozen per ``encoder``); stage 2: the Combiner."""
        clip = load_task_clip(self.config)
        self.clip = clip
        if self.config.stage == 1:
            clip.set_trainable(
                text=self.config.model.encoder in ("text", "both"), image=self.config.model.encoder != "text"
            )
            self.fuser = build_fuser(self.config, clip.feature_dim)
            return clip
        clip.requires_grad_(False).eval()
        self.fuser = build_fuser(self.config, clip.feature_dim)
        return self.fuser

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        params = [p for p in model.parameters() if p.requires_grad]
        name = "clip" if self.config.stage == 1 else "combiner"
        return [
            {
                "params": params,
                "lr": self.stage_config.lr,
                "weight_decay": self.stage_config.weight_decay,
                "name": name,
            }
        ]

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Batch-based classification loss of the stage (CLIP4Cir Sec. 3.1/3.2)."""
        if self.config.stage == 2:
            query = model(batch["reference"], batch["text"])
            return {
                "loss": batch_classification_loss(query, batch["target"], scale=self.config.loss.logit_scale)
            }
        tokens = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "reference_pixels" in batch:
            n = batch["reference_pixels"].shape[0]
            pixels = torch.cat([batch["reference_pixels"], batch["target_pixels"]])
            out = model(pixels=pixels, **tokens)
            reference, target = out["image"][:n], out["image"][n:]
        else:
            out = model(**tokens)
            reference, target = batch["reference"], batch["target"]
        assert self.fuser is not None  # build_model ran: the stage-1 fuser is the parameter-free sum
        query = self.fuser(reference.to(out["text"].dtype), out["text"])
        target = target.to(query.dtype)
        return {"loss": batch_classification_loss(query, target, scale=self.config.loss.logit_scale)}

    # ----------------------------------------------------------------------------------------- eval
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics on ``val_split`` with the stage's fuser, by the benchmark's own protocol
        (:func:`capret.inference.cir.benchmarks.evaluate_cir`, as ``capret-eval cir``); CIRR adds the
        model-selection number ``r5_rs1_mean``."""
        model = unwrap_model(model)
        clip = model if self.config.stage == 1 else self.clip
        fuser = self.fuser if self.config.stage == 1 else model
        assert isinstance(clip, ClipBundle) and fuser is not None
        # stage 1 changes the text tower (and maybe the image tower) between evaluations: cache only what is frozen
        options = FeatureOptions(
            cache_dir=self._cache_dir if self._images_frozen else None,
            cache_texts=self.config.stage == 2,
            image_fingerprint=self._image_fp,
            text_fingerprint=self._text_fp,
            batch_size=self.config.data.encode_batch_size,
            num_workers=self.config.trainer.num_workers,
        )
        data = self.config.data
        benchmark = open_benchmark(
            data.dataset,
            root=data.root,
            split=data.val_split,
            categories=data.categories if data.dataset == "fashioniq" else None,
        )
        method = FuserMethod(
            clip,
            fuser=fuser,
            checkpoint=None,
            stage=self.config.stage,
            clip_record=to_dict(self.config.model.clip),
        )
        return dict(evaluate_cir(method, benchmark, baselines=False, options=options).metrics)

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.config)

    def export(self, result: dict[str, Any], folder: Path) -> dict[str, Any]:
        """The selected (else last) weights of the stage as a ``combiner`` model folder; the CLIP's weights go
        in too whenever they are not the named pretrained ones (stage 1, or stage 2 started from stage 1)."""
        clip = self.clip if self.clip is not None else load_task_clip(self.config)
        fuser = self.fuser if self.fuser is not None else build_fuser(self.config, clip.feature_dim)
        selected_weights(clip if self.config.stage == 1 else fuser, result)
        save_combiner_folder(
            folder,
            clip=clip,
            fuser=fuser,
            config=CombinerRecord(stage=self.config.stage, model=self.config.model),
            clip_trained=self.config.stage == 1 or self.config.model.stage1_checkpoint is not None,
            trained_from=self.config_dict(),
        )
        return {"bad_images": len(self.bad_images)} if self.config.data.on_bad_image == "skip" else {}


#: names of the validation metrics of each dataset, for checking ``trainer.monitor`` before training starts
def _metric_names(config: CombinerTaskConfig) -> list[str]:
    if config.data.dataset == "fashioniq":
        names = [f"{c}/recall@{k}" for c in config.data.categories for k in (10, 50)]
        return [*names, "average/recall@10", "average/recall@50", "average"]
    return [
        *(f"recall@{k}" for k in (1, 5, 10, 50)),
        *(f"recall_subset@{k}" for k in (1, 2, 3)),
        "r5_rs1_mean",
    ]


def run(config: CombinerTaskConfig, *, resume: str | None = None) -> dict[str, Any]:
    """Train the configured stage, then export its ``combiner`` model folder; the run folder is
    ``<trainer.output_dir>/stage<N>`` and the model folder its ``model/``.

    Returns the trainer's summary (final/best metrics, checkpoint paths, ``model_dir``).
    """
    check_task_name(config, "combiner")
    names = _metric_names(config)
    if config.trainer.monitor not in names:
        raise ConfigError(
            f"trainer.monitor={config.trainer.monitor!r} is not a {config.data.dataset} validation metric; valid: "
            f"{', '.join(names)} (paper: {'average' if config.data.dataset == 'fashioniq' else 'r5_rs1_mean'})"
        )
    stage = config.stage1 if config.stage == 1 else config.stage2
    trainer_config = replace(
        config.trainer, output_dir=str(Path(config.trainer.output_dir) / f"stage{config.stage}")
    )
    if stage.epochs is not None:
        trainer_config = replace(trainer_config, epochs=stage.epochs, max_steps=None)
    if stage.eval_every is not None:
        trainer_config = replace(trainer_config, eval_every=stage.eval_every)
    task = CombinerTask(config)
    return train_and_export(task, trainer_config, resume=resume, export=task.export)


register_task("combiner", CombinerTaskConfig, run)
