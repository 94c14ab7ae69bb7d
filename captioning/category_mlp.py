"""``pixel-mlp``: a hand-made descriptor of the item crop into a linear layer or a one-hidden-layer MLP.

The descriptor (:func:`pixel_features`) is an HSV joint colour histogram and 2x2-cell gradient-orientation
histograms of the crop (as in the quickstart's baseline) plus the box geometry (aspect ratio, area share and
centre of the box in its image: tops sit high, trousers are tall); a standardised linear layer or MLP on it is
trained full-batch with AdamW. CPU-cheap, but colour and four orientation cells cannot name 13 silhouettes
(about 0.2 validation accuracy on the garment world, where the ``pixel-cnn`` of :mod:`captioning.category_cnn`
reaches about 0.5).

Training on caption targets (the registered trainer, :func:`fit_mlp_on_targets`): the reported model is fitted
with a share of the identity groups held out for its ``heldout_accuracy``, and ``folds`` more models give the
out-of-fold predictions that caption the train items (:func:`cross_fitted_predictions`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from capret.data.pixel_stats import hsv_histogram, orientation_histogram
from capret.errors import ConfigError, DataError
from captioning import category

__all__ = [
    "FEATURE_DIM",
    "FEATURE_VERSION",
    "MlpTraining",
    "PixelMlpModel",
    "accuracy_metrics",
    "cross_fitted_predictions",
    "fit_category_model",
    "fit_mlp_on_targets",
    "pixel_features",
]

FEATURE_VERSION = "capret-pixfeat-v1"

_HSV_BINS = (8, 4, 4)
_ORIENTATION_BINS = 8
_TILE = 48
#: colour histogram + 4 cells of orientations + box geometry
FEATURE_DIM = int(np.prod(_HSV_BINS)) + 4 * _ORIENTATION_BINS + category.GEOMETRY_DIM


def pixel_features(image: Image.Image, box: category.Box | None) -> np.ndarray:
    """``[FEATURE_DIM]`` float32 descriptor of the item in ``box`` of the full ``image`` (see module docstring)."""
    inside = category.box_in(image, box)
    tile = image.convert("RGB").crop(inside)
    tile = tile.resize((_TILE, _TILE), Image.Resampling.BILINEAR)
    colour = np.sqrt(hsv_histogram(tile, _HSV_BINS))
    texture = np.sqrt(orientation_histogram(tile, _ORIENTATION_BINS))
    return np.concatenate([colour, texture, category.box_geometry(image, inside)]).astype(np.float32)


class PixelMlpModel(category.CategoryModel):
    """Standardised pixel features -> linear layer (``hidden=0``, multinomial logistic regression) or MLP."""

    kind = "pixel-mlp"
    version = FEATURE_VERSION

    def __init__(self, *, classes: Sequence[str], hidden: int = 0, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__(classes=classes, standardised=feature_dim)
        if hidden < 0:
            raise ConfigError(f"hidden must be >= 0, got {hidden}")
        self.hidden = hidden
        self.feature_dim = feature_dim
        if hidden:
            self.head: nn.Module = nn.Sequential(
                nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, len(classes))
            )
        else:
            self.head = nn.Linear(feature_dim, len(classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head((features - self.mean) / self.std)

    def config(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "feature_dim": self.feature_dim}

    def encode(self, images: Sequence[Image.Image], boxes: Sequence[category.Box | None]) -> np.ndarray:
        return np.stack([pixel_features(im, b) for im, b in zip(images, boxes)])

    def probabilities(self, inputs: Any) -> torch.Tensor:
        return torch.softmax(self(torch.as_tensor(inputs, dtype=torch.float32)), dim=-1)


category.register_category_model("pixel-mlp")(PixelMlpModel)


@dataclass(frozen=True)
class MlpTraining:
    """How a ``pixel-mlp`` category model is trained; one value serves the reported model and every
    cross-fitted fold, so their hyperparameters cannot drift apart."""

    hidden: int = 64  # hidden units (0 = a linear classifier)
    epochs: int = 300  # full-batch AdamW epochs (a time budget may stop it earlier)
    lr: float = 1e-2  # AdamW learning rate
    weight_decay: float = 1e-3  # AdamW decoupled weight decay


def _fit_mlp(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    classes: Sequence[str],
    training: MlpTraining,
    seed: int,
    max_seconds: float | None,
) -> tuple[PixelMlpModel, int]:
    """A fresh ``pixel-mlp`` (seeded) trained by full-batch AdamW; returns it and the epochs run (a time budget
    may stop it early)."""
    torch.manual_seed(seed)
    model = PixelMlpModel(classes=classes, hidden=training.hidden)
    with category.one_thread():
        return model, _train_loop(model, features, labels, training=training, max_seconds=max_seconds)


def _train_loop(
    model: PixelMlpModel,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    training: MlpTraining,
    max_seconds: float | None,
) -> int:
    model.fit_standardisation(features)
    optimiser = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    start = time.perf_counter()
    model.train()
    done = 0
    while done < training.epochs:
        optimiser.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(features), labels)
        loss.backward()
        optimiser.step()
        done += 1
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    model.eval()
    return done


def fit_category_model(
    rows: category.LabelledRows,
    *,
    heldout_fraction: float = 0.2,
    training: MlpTraining | None = None,
    seed: int = 0,
    max_seconds: float | None = 30.0,
) -> PixelMlpModel:
    """Train a ``pixel-mlp`` category model and measure its accuracy on held-out groups.

    Args:
        rows: :func:`pixel_features` rows of the training items, their category names (training supervision
            from the *train* split's annotation) and groups; held-out items come from whole groups, so the
            accuracy is measured on garments the model never saw.
        heldout_fraction: share of groups held out for the reported accuracy (0 = none, no accuracy).
        training: the model size and optimisation (default :class:`MlpTraining`).
        max_seconds: time budget of the optimisation.

    Returns:
        The model trained on the non-held-out items, with ``metrics`` holding ``heldout_accuracy``,
        ``train_accuracy``, the majority-class and chance accuracies, the item counts and ``seconds``.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    start = time.perf_counter()
    classes, target = rows.classes_and_targets()
    inputs = torch.as_tensor(np.asarray(rows.inputs, dtype=np.float32))
    unique_groups = sorted(set(rows.groups), key=repr)
    order = np.random.default_rng(seed).permutation(len(unique_groups))
    n_held = int(round(heldout_fraction * len(unique_groups)))
    held_groups = {unique_groups[i] for i in order[:n_held]}
    held = torch.tensor([g in held_groups for g in rows.groups], dtype=torch.bool)
    if bool(held.all()):
        raise ConfigError("every item is held out; lower heldout_fraction")
    model, epochs_run = _fit_mlp(inputs[~held], target[~held], classes=classes, seed=seed,
                                 training=training or MlpTraining(), max_seconds=max_seconds)  # fmt: skip
    with torch.no_grad():
        correct = model(inputs).argmax(-1) == target
    model.metrics = {
        **accuracy_metrics(correct=correct, target=target, train=~held, classes=classes),
        "heldout_groups": n_held,
        "epochs": epochs_run,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return model


def accuracy_metrics(
    *, correct: torch.Tensor, target: torch.Tensor, train: torch.Tensor, classes: Sequence[str]
) -> dict[str, Any]:
    """Item counts and accuracies of a fitted model: on its training rows (``train``), on the held-out rest,
    and what the training rows' majority class and chance would score on the held-out rows."""
    held = ~train
    any_held = bool(held.any())
    majority = torch.bincount(target[train], minlength=len(classes)).argmax()
    return {
        "train_items": int(train.sum()),
        "heldout_items": int(held.sum()),
        "train_accuracy": float(correct[train].float().mean()),
        "heldout_accuracy": float(correct[held].float().mean()) if any_held else None,
        "majority_class_heldout_accuracy": float((target[held] == majority).float().mean())
        if any_held
        else None,
        "chance_accuracy": 1.0 / len(classes),
    }


def cross_fitted_predictions(
    rows: category.LabelledRows,
    *,
    folds: int = 5,
    training: MlpTraining | None = None,
    seed: int = 0,
    max_seconds: float | None = None,
) -> list[category.CategoryPrediction]:
    """Out-of-fold ``pixel-mlp`` predictions: every item's category predicted by a model that never saw its
    group.

    A caption of a *training* item must not name a category the classifier memorised (100% right on its own
    training items) when the captions of new items name a category it guessed: the retrieval model would learn
    to trust a word that is wrong at test time. Cross-fitting (stacking) gives training captions exactly the
    error rate of unseen items.
    """
    if folds < 2:
        raise ConfigError(f"folds must be >= 2, got {folds}")
    fold = rows.group_folds(folds, seed=seed)
    classes, target = rows.classes_and_targets()
    features = np.asarray(rows.inputs, dtype=np.float32)
    inputs = torch.as_tensor(features)
    out: list[category.CategoryPrediction | None] = [None] * len(rows.labels)
    start = time.perf_counter()
    for index in range(folds):
        test = torch.as_tensor(fold == index)
        if not bool(test.any()) or bool(test.all()):
            continue
        left = None
        if max_seconds is not None:
            left = max(0.5, (max_seconds - (time.perf_counter() - start)) / (folds - index))
        model, _ = _fit_mlp(inputs[~test], target[~test], classes=classes, training=training or MlpTraining(),
                            seed=seed + index, max_seconds=left)  # fmt: skip
        for i, prediction in zip(
            np.flatnonzero(fold == index), model.predict_inputs(features[fold == index])
        ):
            out[int(i)] = prediction
    if any(p is None for p in out):
        raise DataError(f"cross-fitting needs at least 2 groups with items, got {len(set(rows.groups))}")
    return [p for p in out if p is not None]


@category.register_category_trainer("pixel-mlp")
def fit_mlp_on_targets(
    *,
    images: Sequence[Any],
    boxes: Sequence[category.Box],
    image_keys: Sequence[str],
    labels: list[str],
    groups: list[str],
    training: MlpTraining | None,
    heldout_fraction: float,
    folds: int | None,
    seed: int,
    max_seconds: float | None,
    progress: bool,
) -> tuple[category.CategoryModel, list[category.CategoryPrediction]]:
    """The ``pixel-mlp`` trainer of :func:`captioning.category.fit_category_model_on_targets`: the descriptors
    of the item boxes, then the reported model (``heldout_fraction`` of the groups held out) and ``folds``
    (default 5, capped at the number of groups) cross-fitted models, each with half of what the descriptors
    leave of ``max_seconds``."""
    start = time.perf_counter()
    features = np.stack(
        category.target_features(images, boxes, image_keys, encode=pixel_features, progress=progress)
    )
    data = category.LabelledRows(features, labels, groups)
    left = None if max_seconds is None else max(1.0, (max_seconds - (time.perf_counter() - start)) / 2)
    model = fit_category_model(data, heldout_fraction=heldout_fraction, training=training, seed=seed,
                               max_seconds=left)  # fmt: skip
    folds = min(folds or 5, len(set(groups)))
    return model, cross_fitted_predictions(data, folds=folds, training=training, seed=seed, max_seconds=left)
