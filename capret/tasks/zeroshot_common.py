"""What the three zero-shot mapper tasks (``phi``, ``pic2word``, ``lincir``) share.

Each trains only a small mapping network on top of a *frozen* CLIP, so: the CLIP is loaded once and follows the
mapper to the trainer's device; image features of an unlabeled image collection are computed once through the
feature cache (:mod:`capret.inference.cir.features`); batches are index lists that depend only on
``(rank, world_size, epoch, seed)`` (the trainer's resume contract); and after training the mapper is exported
as a model folder of the task's kind (``<output_dir>/model``) that :func:`capret.load` rebuilds with its CLIP.

Their configs have the shape of every task: ``data`` (what is trained on, batch size, feature cache), ``model``
(the frozen CLIP with its preprocessing, the mapper's sizes, the placeholder), ``loss`` (the method's objective)
and ``trainer`` (the shared loop, including ``lr`` and ``weight_decay`` as in the dual-stream and detector tasks).
The model's configs (:class:`~capret.models.zeroshot.MapperModelConfig`) live in :mod:`capret.models.zeroshot`,
so inference reads them without this module; sidecars written with the earlier flat keys go through
:func:`capret.models.zeroshot.upgrade_config_dict`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capret.config import cfg, to_dict
from capret.data.image_sources import ImageSource
from capret.engine.distributed import DistContext
from capret.engine.trainer import TrainerConfig, unwrap_model
from capret.errors import ConfigError
from capret.inference.cir.benchmarks import evaluate_cir, open_benchmark
from capret.inference.cir.features import CachedFeatures, image_features
from capret.inference.cir.inversion import ZeroShotModel, save_mapper_folder
from capret.inference.cir.inversion_methods import MapperMethod
from capret.inference.cir.search import FeatureOptions
from capret.models.clip import ClipBundle, load_task_clip_config
from capret.models.zeroshot import (
    ZEROSHOT_TASKS,
    MapperModelConfig,
    MapperRecord,
    build_mapper,
    upgrade_config_dict,
)
from capret.tasks.train_export import check_task_name, selected_weights, train_and_export

__all__ = [
    "ImageDataConfig",
    "MapperModelConfig",
    "MapperTaskBase",
    "MapperValidationConfig",
    "SizedBatches",
    "ZEROSHOT_TASKS",
    "index_batches",
    "mapper_trainer",
    "mapper_validation",
    "no_decay_parameter",
    "run_mapper_task",
    "upgrade_config_dict",
]


@dataclass
class ImageDataConfig:
    """The unlabeled image collection of an image-trained mapper (``phi``, ``pic2word``)."""

    images: str = cfg("data/unlabeled", "unlabeled images: a folder (recursive) or webdataset .tar shards")
    limit: int | None = cfg(None, "use only the first N images (sorted keys)")
    batch_size: int = cfg(256, "images per batch per process (the contrastive negatives)")
    feature_cache: str | None = cfg("auto", "image-feature cache folder; auto = <output_dir>/feature_cache")
    encode_batch_size: int = cfg(64, "images per batch when computing features")


@dataclass
class MapperValidationConfig:
    """Checkpoint selection on a CIR validation split, as SEARLE, Pic2Word and LinCIR select theirs (CIRR val
    R@1 every N steps; ``trainer.eval_every`` is N, ``trainer.monitor`` the metric). Off by default. The split
    chosen here must never be the one you report: the papers report CIRR *test* (the evaluation server) and
    FashionIQ / CIRCO, so select on CIRR val and do not report CIRR val for the selected model."""

    dataset: str | None = cfg(
        None, "benchmark to select on: cirr (the papers') | fashioniq | circo; null = off"
    )
    root: str = cfg("data/cirr", "the benchmark's root folder (official layout)")
    split: str = cfg("val", "split to select on (never the reported one; a test split has no targets)")
    batch_size: int = cfg(64, "images per batch when encoding the validation gallery")


def mapper_trainer(
    *, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> Any:
    """A ``trainer`` section factory with the mapper papers' AdamW (lr 1e-4), weight decay, betas and epsilon."""
    return cfg(
        factory=lambda: TrainerConfig(
            lr=1e-4, weight_decay=weight_decay, betas=list(betas), eps=eps, monitor="recall@1"
        ),
        help="shared training loop (AdamW lr, wd, betas, eps)",
    )


def mapper_validation() -> Any:
    """The ``validation`` section of every mapper task: :class:`MapperValidationConfig`, off by default."""
    return cfg(
        factory=MapperValidationConfig,
        help="checkpoint selection on CIRR val R@1 (the papers'); off by default",
    )


def no_decay_parameter(name: str) -> bool:
    """Pic2Word's (and open_clip's) rule for parameters kept out of weight decay: biases, gains of batch/layer
    norms and the logit scale (``"bn" in n or "ln" in n or "bias" in n or "logit_scale" in n``)."""
    return any(part in name for part in ("bn", "ln", "bias", "logit_scale")) or "norm" in name


def index_batches(
    count: int, *, batch_size: int, rank: int, world_size: int, epoch: int, seed: int
) -> list[list[int]]:
    """Shuffled, equally sized index batches of this rank (drop-last), determined by the arguments alone."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(count, generator=g).tolist()
    per_rank = count // world_size // batch_size * batch_size
    if per_rank == 0:
        raise ConfigError(
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
        self.dist = DistContext()  # replaced by the trainer's ``setup`` call

    def setup(self, dist: DistContext) -> None:
        """The trainer tells the task where it sits in the job (only the main process exports)."""
        self.dist = dist

    def load_frozen_clip(self) -> ClipBundle:
        clip = load_task_clip_config(self.config.model.clip)
        clip.requires_grad_(False).eval()
        self.clip = clip
        return clip

    def mapper_hparams(self) -> dict[str, Any]:
        """Sizes of the mapper: the CLIP's feature size in, its token width out, ``model.hidden_dim`` wide
        (0 = 4 x the feature size)."""
        assert self.clip is not None
        d = self.clip.feature_dim
        return {
            "input_dim": d,
            "hidden_dim": self.config.model.hidden_dim or 4 * d,
            "output_dim": self.clip.token_width,
            "dropout": self.config.model.dropout,
        }

    def build_model(self) -> nn.Module:
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

    def batches(
        self,
        count: int,
        make: Callable[[list[int]], dict[str, Any]],
        *,
        rank: int,
        world_size: int,
        epoch: int,
        seed: int,
    ) -> SizedBatches:
        """This rank's shuffled batches of ``count`` examples (``data.batch_size`` each, the trainer's resume
        contract), each index list made into a batch by ``make``."""
        order = index_batches(
            count,
            batch_size=self.config.data.batch_size,
            rank=rank,
            world_size=world_size,
            epoch=epoch,
            seed=seed,
        )
        return SizedBatches(order, make)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """One group at ``trainer.lr`` / ``trainer.weight_decay`` (the frozen CLIP is not in the model)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "name": self.mapper_kind}]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of the current mapper on ``validation`` (CIRR val R@1 in the papers) by the benchmark's own
        protocol (:func:`capret.inference.cir.benchmarks.evaluate_cir`, as ``capret-eval``); ``{}`` when off.
        Gallery image features are cached (the CLIP is frozen), so each validation encodes only the queries."""
        validation = self.config.validation
        if validation.dataset is None:
            return {}
        if validation.split.startswith("test"):
            raise ConfigError(
                f"validation.split={validation.split!r}: a test split has no public targets, and the split a model "
                "is selected on must never be the one reported; use val"
            )
        mapper = unwrap_model(model)
        clip = self.follow_mapper()
        zeroshot = ZeroShotModel(
            method=self.method, clip=clip, mapper=mapper, placeholder=self.config.model.placeholder,
            record=self.record(),
        )  # fmt: skip
        method = MapperMethod(
            zeroshot, name=self.method, mapper=Path("<training>"), clip_record=to_dict(self.config.model.clip)
        )
        benchmark = open_benchmark(validation.dataset, root=validation.root, split=validation.split)
        # image-trained mappers share their feature cache; LinCIR (captions only) caches under its run folder
        if hasattr(self.config.data, "feature_cache"):
            cache = self.cache_dir()
        else:
            cache = Path(self.config.trainer.output_dir) / "feature_cache"
        options = FeatureOptions(
            cache_dir=cache / "validation" if cache is not None else None,
            cache_texts=False,
            batch_size=validation.batch_size,
            num_workers=self.config.trainer.num_workers,
        )
        was_training = mapper.training
        result = evaluate_cir(method, benchmark, baselines=False, options=options)
        mapper.train(was_training)
        return {k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)}

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

    def record(self) -> MapperRecord:
        """What the exported model folder records: the frozen CLIP, the mapper family and sizes, the method."""
        return MapperRecord(
            clip=self.config.model.clip,
            method=self.method,
            mapper=self.mapper_kind,
            hparams=self.mapper_hparams(),
            placeholder=self.config.model.placeholder,
        )

    def export(self, result: dict[str, Any], folder: Path) -> dict[str, Any]:
        """The last mapper (these tasks have no validation to select by) as a model folder of the task's kind."""
        mapper = selected_weights(
            self.mapper if self.mapper is not None else build_mapper(self.mapper_kind, self.mapper_hparams()),
            result,
        )
        save_mapper_folder(
            folder,
            kind=self.config.task,
            mapper=mapper.cpu(),
            record=self.record(),
            trained_from=self.config_dict(),
        )
        return {}


def run_mapper_task(
    task_cls: type[MapperTaskBase], config: Any, *, name: str, resume: str | None
) -> dict[str, Any]:
    """Train the mapper task ``name`` and export its model folder (``<trainer.output_dir>/model``, kind
    ``name``)."""
    check_task_name(config, name)
    task = task_cls(config)
    return train_and_export(task, config.trainer, resume=resume, export=task.export)
