"""``pixel-cnn``: a small convolutional category model that learns garment silhouettes from the item crop.

The ``pixel-mlp`` model sees a colour histogram and four cells of gradient orientations: it cannot tell a
sleeveless top from a sling or shorts from a skirt, and on the garment world it names the validation
category right about one time in five. Here the crop itself is the input: the item box (plus a small margin)
stretched to a ``size`` x ``size`` RGB tile, so the garment fills the tile whatever its aspect ratio, and the
box geometry (log aspect ratio, area share and centre in the image, relative width and height) beside it,
which carries the aspect the stretch removed and where in the photo the garment sits.

Categories live in the silhouette, not in the colour or the print (every identity of the world has its own),
so training augments against both: horizontal flips (the box centre mirrors with them), a random order of
the colour channels, saturation, brightness and contrast jitter, and a small random scale, aspect and shift.
Each member network is four 3x3 conv blocks (BatchNorm, ReLU, 2x2 max-pool) ending in a 2x2 average pool, so
the head still sees where in the tile the sleeves, straps and hems are; the weights kept are an exponential
moving average of the AdamW iterates (no checkpoint is picked by any score).

Training is a K-fold ensemble: the train items' identities are dealt into ``folds`` folds and member ``k``
trains on all folds but ``k``. Member ``k``'s predictions on fold ``k`` are the out-of-fold (cross-fitted)
predictions the train captions use and their accuracy is the reported held-out accuracy (garments that
member never saw); new items are named by the mean of all members' probabilities over the tile and its
mirror image. Every training step of every member is paid for once, no model is trained only to be measured.
Each member runs a fixed number of steps, capped by its share of a time budget, on one CPU thread.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from capret.errors import ConfigError, DataError
from captioning.category import (
    GEOMETRY_DIM,
    Box,
    CategoryModel,
    CategoryPrediction,
    LabelledRows,
    box_geometry,
    box_in,
    one_thread,
    register_category_model,
    register_category_trainer,
    target_features,
)

__all__ = [
    "CNN_VERSION",
    "CnnInputs",
    "CnnTraining",
    "PixelCnnModel",
    "fit_cnn_category_model",
    "tile_inputs",
]

CNN_VERSION = "capret-pixcnn-v1"
_CENTRE_X = 2  # index of the box centre's x in box_geometry (mirrored by a flip)


@dataclass(frozen=True)
class CnnTraining:
    """The ``pixel-cnn`` architecture and how its members are trained (one value for every member)."""

    size: int = 24  # side of the input tile in pixels
    width: int = 16  # channels of the first conv block (then 2x, 4x, 4x)
    margin: float = 0.08  # share of the box width/height added around it on each side
    folds: int = 3  # members = identity folds (each member holds one fold out)
    steps: int = 500  # AdamW steps per member (a time budget may stop it earlier)
    batch_size: int = 32
    lr: float = 3e-3  # AdamW peak learning rate, reached after a linear warm-up of ``warmup`` steps
    warmup: int = 20
    schedule: str = "constant"  # after the warm-up; or "cosine" (to 0 when the step or time budget ends)
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    ema: float = 0.99  # decay of the weight average kept as the member
    rotation: float = 0.0  # largest random rotation of a training view, in radians
    erase: float = 0.0  # probability that a training view gets a random occluding square

    def __post_init__(self) -> None:
        for name, low in (
            ("size", 16),
            ("width", 1),
            ("folds", 2),
            ("steps", 1),
            ("batch_size", 1),
            ("warmup", 1),
        ):
            if getattr(self, name) < low:
                raise ConfigError(f"CnnTraining.{name} must be >= {low}, got {getattr(self, name)!r}")
        if not 0.0 <= self.erase <= 1.0:
            raise ConfigError(f"CnnTraining.erase must be in [0, 1], got {self.erase!r}")
        for name in ("margin", "weight_decay", "label_smoothing", "ema"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"CnnTraining.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"CnnTraining.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not 0.0 <= self.rotation <= np.pi:
            raise ConfigError(f"CnnTraining.rotation must be in [0, pi], got {self.rotation!r}")
        if not self.lr > 0.0:
            raise ConfigError(f"CnnTraining.lr must be > 0, got {self.lr!r}")

    def architecture(self) -> dict[str, Any]:
        """The :class:`PixelCnnModel` arguments this training builds."""
        return {"size": self.size, "width": self.width, "margin": self.margin, "members": self.folds}


def tile_inputs(
    image: Image.Image, box: Box | None, *, size: int, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """The ``[3, size, size]`` uint8 tile of the item (box plus ``margin`` on each side, stretched; outside the
    image is black) and its ``[GEOMETRY_DIM]`` float32 box geometry."""
    left, top, right, bottom = box_in(image, box)
    dx, dy = margin * (right - left), margin * (bottom - top)
    tile = image.convert("RGB").crop(
        (round(left - dx), round(top - dy), round(right + dx), round(bottom + dy))
    )
    array = np.asarray(tile.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return np.ascontiguousarray(array.transpose(2, 0, 1)), box_geometry(image, (left, top, right, bottom))


@dataclass(frozen=True)
class CnnInputs:
    """Encoded items: uint8 tiles ``[N, 3, S, S]`` and float32 box geometry ``[N, GEOMETRY_DIM]``."""

    tiles: torch.Tensor
    geometry: torch.Tensor

    @classmethod
    def stack(cls, rows: Sequence[tuple[np.ndarray, np.ndarray]], *, size: int) -> CnnInputs:
        if not rows:
            return cls(torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, GEOMETRY_DIM))
        return cls(
            torch.from_numpy(np.stack([t for t, _ in rows])), torch.from_numpy(np.stack([g for _, g in rows]))
        )

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: Any) -> CnnInputs:
        return CnnInputs(self.tiles[index], self.geometry[index])


def _block(inputs: int, outputs: int) -> list[nn.Module]:
    return [
        nn.Conv2d(inputs, outputs, 3, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    ]


class _Member(nn.Module):
    """Four conv blocks, a 2x2 average pool that keeps the layout, and a linear head over it and the geometry."""

    def __init__(self, *, width: int, classes: int) -> None:
        super().__init__()
        w = width
        self.trunk = nn.Sequential(
            *_block(3, w), nn.MaxPool2d(2), *_block(w, 2 * w), nn.MaxPool2d(2),
            *_block(2 * w, 4 * w), nn.MaxPool2d(2), *_block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(16 * w + GEOMETRY_DIM, classes))

    def forward(self, tiles: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.trunk(tiles), geometry], dim=1))


@register_category_model("pixel-cnn")
class PixelCnnModel(CategoryModel):
    """An ensemble of ``members`` small CNNs over the item tile and its box geometry (module docstring)."""

    kind = "pixel-cnn"
    version = CNN_VERSION  # the standardised inputs are the box geometry

    def __init__(
        self,
        *,
        classes: Sequence[str],
        size: int = 24,
        width: int = 16,
        margin: float = 0.08,
        members: int = 1,
    ) -> None:
        super().__init__(classes=classes, standardised=GEOMETRY_DIM)
        for name, value, low in (("size", size, 16), ("width", width, 1), ("members", members, 1)):
            if value < low:
                raise ConfigError(f"pixel-cnn {name} must be >= {low}, got {value!r}")
        if not 0.0 <= margin < 1.0:
            raise ConfigError(f"pixel-cnn margin must be in [0, 1), got {margin!r}")
        self.size, self.width, self.margin = size, width, margin
        self.members = nn.ModuleList(_Member(width=width, classes=len(self.classes)) for _ in range(members))

    def config(self) -> dict[str, Any]:
        return {"size": self.size, "width": self.width, "margin": self.margin, "members": len(self.members)}

    def encode(self, images: Sequence[Image.Image], boxes: Sequence[Box | None]) -> CnnInputs:
        rows = [tile_inputs(im, b, size=self.size, margin=self.margin) for im, b in zip(images, boxes)]
        return CnnInputs.stack(rows, size=self.size)

    def member_logits(self, member: nn.Module, tiles: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """Logits of one member for float tiles in [0, 1] and raw geometry."""
        return member(tiles, (geometry - self.mean) / self.std)

    @torch.no_grad()
    def probabilities(self, inputs: Any, *, members: Sequence[int] | None = None) -> torch.Tensor:
        """Mean softmax of the chosen members (default all) over each tile and its mirror image."""
        if not isinstance(inputs, CnnInputs):
            raise DataError(f"pixel-cnn takes CnnInputs (from its encode()), got {type(inputs).__name__}")
        if inputs.tiles.shape[1:] != (3, self.size, self.size):
            raise DataError(
                f"pixel-cnn tiles must be [N, 3, {self.size}, {self.size}], got {list(inputs.tiles.shape)}"
            )
        chosen = [self.members[i] for i in (range(len(self.members)) if members is None else members)]
        self.eval()
        out = []
        with one_thread():  # measured 3-9x faster than 2 threads for these small convs on a shared CPU
            for start in range(0, len(inputs), 256):
                tiles = inputs.tiles[start : start + 256].float() / 255.0
                geometry = inputs.geometry[start : start + 256]
                views = (
                    (tiles, geometry),
                    _mirror(tiles, geometry, torch.ones(len(tiles), dtype=torch.bool)),
                )
                probs = [self.member_logits(m, t, g).softmax(-1) for m in chosen for t, g in views]
                out.append(torch.stack(probs).mean(0))
        return torch.cat(out)


def _mirror(
    tiles: torch.Tensor, geometry: torch.Tensor, which: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip the ``which`` rows left to right; their box centre mirrors with them."""
    tiles = torch.where(which[:, None, None, None], tiles.flip(3), tiles)
    geometry = geometry.clone()
    geometry[:, _CENTRE_X] = torch.where(which, 1.0 - geometry[:, _CENTRE_X], geometry[:, _CENTRE_X])
    return tiles, geometry


def augment(
    tiles: torch.Tensor,
    geometry: torch.Tensor,
    *,
    generator: torch.Generator,
    rotation: float = 0.0,
    erase: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random view of uint8 tiles as floats in [0, 1]: flip, channel order, saturation, brightness and
    contrast, scale/aspect/shift (module docstring: silhouettes, not colours or prints, name a category), a
    rotation of up to ``rotation`` radians, and with probability ``erase`` a random square of up to half the
    tile's side filled with one random colour (an occluder: an arm, a bag, another garment)."""
    n = len(tiles)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, generator=generator) * (high - low) + low

    x, geometry = _mirror(tiles.float() / 255.0, geometry, torch.rand(n, generator=generator) < 0.5)
    order = torch.rand(n, 3, generator=generator).argsort(dim=1)
    x = x.gather(1, order[:, :, None, None].expand_as(x))
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * uniform(0.0, 1.3, 1, 1, 1)
    x = x * uniform(0.7, 1.3, 1, 1, 1) + uniform(-0.15, 0.15, 1, 1, 1)
    scale, angle = uniform(0.85, 1.15), uniform(-rotation, rotation)
    cos, sin = torch.cos(angle), torch.sin(angle)
    stretch = uniform(0.9, 1.1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = scale * stretch * cos, -scale * sin
    theta[:, 1, 0], theta[:, 1, 1] = scale * stretch * sin, scale * cos
    theta[:, :, 2] = uniform(-0.1, 0.1, 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    if erase > 0.0:
        side = x.shape[-1]
        half = (uniform(0.1, 0.25) * side).round()
        centre_x, centre_y = uniform(0.0, side), uniform(0.0, side)
        pixels = torch.arange(side, dtype=torch.float32)
        inside = ((pixels[None, None, :] - centre_x[:, None, None]).abs() <= half[:, None, None]) & (
            (pixels[None, :, None] - centre_y[:, None, None]).abs() <= half[:, None, None]
        )
        inside &= (torch.rand(n, generator=generator) < erase)[:, None, None]
        x = torch.where(inside[:, None], uniform(0.0, 1.0, 3, 1, 1), x)
    return x, geometry


def _learning_rate(training: CnnTraining, *, step: int, elapsed: float, limit: float | None) -> float:
    """Linear warm-up, then constant or a cosine to zero over whichever budget (steps or seconds) runs out
    first, so a member stopped by the clock under load still ends on small steps."""
    warm = min(1.0, (step + 1) / training.warmup)
    if training.schedule == "constant":
        return training.lr * warm
    progress = step / training.steps
    if limit is not None and limit > 0:
        progress = max(progress, elapsed / limit)
    return training.lr * warm * 0.5 * (1.0 + float(np.cos(np.pi * min(1.0, progress))))


def _train_member(
    model: PixelCnnModel,
    index: int,
    inputs: CnnInputs,
    target: torch.Tensor,
    *,
    training: CnnTraining,
    seed: int,
    max_seconds: float | None,
) -> int:
    """Train member ``index`` on (inputs, target) in place; keep its weight average; return the steps run."""
    member = model.members[index]
    average = copy.deepcopy(member)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(member.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    start = time.perf_counter()
    member.train()
    step = 0
    while step < training.steps:
        for group in optimiser.param_groups:
            group["lr"] = _learning_rate(
                training, step=step, elapsed=time.perf_counter() - start, limit=max_seconds
            )
        batch = torch.randint(0, len(inputs), (training.batch_size,), generator=generator)
        tiles, geometry = augment(inputs.tiles[batch], inputs.geometry[batch], generator=generator,
                                  rotation=training.rotation, erase=training.erase)  # fmt: skip
        loss = F.cross_entropy(model.member_logits(member, tiles, geometry), target[batch],
                               label_smoothing=training.label_smoothing)  # fmt: skip
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        decay = min(training.ema, (1.0 + step) / (10.0 + step))  # short runs are not dominated by the init
        with torch.no_grad():
            for kept, live in zip(average.parameters(), member.parameters()):
                kept.lerp_(live, 1.0 - decay)
            for kept_buffer, live_buffer in zip(average.buffers(), member.buffers()):
                kept_buffer.copy_(live_buffer)
        step += 1
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    member.load_state_dict(average.state_dict())
    member.eval()
    return step


def fit_cnn_category_model(
    rows: LabelledRows,
    *,
    training: CnnTraining | None = None,
    seed: int = 0,
    max_seconds: float | None = None,
) -> tuple[PixelCnnModel, list[CategoryPrediction]]:
    """Train a ``pixel-cnn`` K-fold ensemble (module docstring) and its out-of-fold predictions.

    Args:
        rows: :class:`CnnInputs` of the training items (:func:`tile_inputs` rows stacked), their category names
            (the *train* split's annotation: training supervision) and identity groups.
        training: architecture and optimisation (default :class:`CnnTraining`); ``training.folds`` members.
        seed: seeds the fold deal, the initialisation, the batches and the augmentation.
        max_seconds: time budget of all members together (each gets an equal share of what is left).

    Returns:
        The model (every member; ``metrics`` with ``heldout_accuracy`` = out-of-fold accuracy, the ensemble's
        ``train_accuracy``, majority-class and chance accuracies, ``steps`` per member and ``seconds``) and one
        out-of-fold prediction per row.
    """
    training = training or CnnTraining()
    inputs = rows.inputs
    if not isinstance(inputs, CnnInputs):
        raise DataError(f"pixel-cnn rows must be CnnInputs, got {type(inputs).__name__}")
    if inputs.tiles.shape[1:] != (3, training.size, training.size):
        raise DataError(f"tiles are {list(inputs.tiles.shape[1:])}, CnnTraining.size is {training.size}")
    if len(set(rows.groups)) < training.folds:
        raise DataError(f"{training.folds} folds need at least as many groups, got {len(set(rows.groups))}")
    start = time.perf_counter()
    classes, target = rows.classes_and_targets()
    fold = torch.as_tensor(rows.group_folds(training.folds, seed=seed))
    torch.manual_seed(seed)
    model = PixelCnnModel(classes=classes, **training.architecture())
    model.fit_standardisation(inputs.geometry)
    oof = torch.zeros(len(inputs), len(classes))
    steps, majority_right = [], 0
    with one_thread():
        for k in range(training.folds):
            left = None
            if max_seconds is not None:
                left = max(0.5, (max_seconds - (time.perf_counter() - start)) / (training.folds - k))
            train, held = fold != k, fold == k
            steps.append(_train_member(model, k, inputs[train], target[train], training=training,
                                       seed=seed * 1009 + k, max_seconds=left))  # fmt: skip
            oof[held] = model.probabilities(inputs[held], members=[k])
            majority = torch.bincount(target[train], minlength=len(classes)).argmax()
            majority_right += int((target[held] == majority).sum())
        ensemble = model.probabilities(inputs)
    score, index = oof.max(dim=-1)
    model.metrics = {
        "train_items": len(inputs),
        "heldout_items": len(inputs),  # every item once, by the member that never saw its identity
        "heldout_accuracy": float((index == target).float().mean()),
        "train_accuracy": float((ensemble.argmax(-1) == target).float().mean()),
        "majority_class_heldout_accuracy": majority_right / len(inputs),
        "chance_accuracy": 1.0 / len(classes),
        "members": training.folds,
        "steps": steps,
        "training": {f.name: getattr(training, f.name) for f in fields(training)},
        "seconds": round(time.perf_counter() - start, 2),
    }
    predictions = [CategoryPrediction(classes[i], float(s)) for i, s in zip(index.tolist(), score.tolist())]
    return model, predictions


@register_category_trainer("pixel-cnn")
def fit_cnn_on_targets(
    *,
    images: Sequence[Any],
    boxes: Sequence[Box],
    image_keys: Sequence[str],
    labels: list[str],
    groups: list[str],
    training: CnnTraining | None,
    heldout_fraction: float,
    folds: int | None,
    seed: int,
    max_seconds: float | None,
    progress: bool,
) -> tuple[CategoryModel, list[CategoryPrediction]]:
    """The ``pixel-cnn`` trainer of :func:`captioning.category.fit_category_model_on_targets`: tiles of the item
    boxes, then :func:`fit_cnn_category_model` with ``folds`` members (capped at the number of groups);
    ``max_seconds`` covers the tiling too. ``heldout_fraction`` is not used: every item is held out once, by
    the member of its fold."""
    start = time.perf_counter()
    training = training or CnnTraining()
    training = replace(training, folds=min(folds or training.folds, len(set(groups))))
    tiles = target_features(images, boxes, image_keys, progress=progress,
                            encode=partial(tile_inputs, size=training.size, margin=training.margin))  # fmt: skip
    left = None if max_seconds is None else max(1.0, max_seconds - (time.perf_counter() - start))
    rows = LabelledRows(CnnInputs.stack(tiles, size=training.size), labels, groups)
    return fit_cnn_category_model(rows, training=training, seed=seed, max_seconds=left)
