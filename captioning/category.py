"""A small garment-category classifier, so captions can name the category without reading the annotation.

Captions must be functions of the pixels and the item box (DESIGN.md "No oracle by default"): the dataset's
``category_name`` would otherwise reach every caption of queries and gallery alike and turn a caption
experiment into a category oracle. The template backend and the questioner prompts therefore get the category
from a model: this classifier, trained on the *train* split's crops (the annotation is its supervision, as for
any trained model) and applied to every split, or a detector's class when one is used.

The registered ``pixel-mlp`` model is deliberately small and CPU-cheap: a hand-made descriptor of the crop
(HSV joint colour histogram, 2x2-cell gradient-orientation histograms, as in the quickstart's baseline) plus
box geometry (aspect ratio, area share and centre of the box in its image: tops sit high, trousers are tall)
feeds a standardised linear layer or one-hidden-layer MLP trained full-batch with AdamW. Saved as safetensors
plus a JSON sidecar (classes, feature version, held-out accuracy), beside the captions it produced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from capret.data.pixel_stats import hsv_histogram, orientation_histogram
from capret.errors import CheckpointError, ConfigError, DataError, IncompleteCheckpointError
from capret.io import atomic_write_json
from capret.registry import Registry
from captioning.store import beside_store

if TYPE_CHECKING:
    from captioning.sources import CaptionTarget

__all__ = [
    "CATEGORY_MODEL_FILE",
    "FEATURE_VERSION",
    "CategoryModel",
    "MlpTraining",
    "CategoryPrediction",
    "category_model_dir",
    "create_category_model",
    "cross_fitted_predictions",
    "fit_category_model",
    "fit_category_model_on_targets",
    "list_category_models",
    "load_category_model",
    "pixel_features",
    "register_category_model",
    "sleeves_of",
    "target_features",
]

CATEGORY_MODEL_FILE = "category_model.json"
FEATURE_VERSION = "capret-pixfeat-v1"

_HSV_BINS = (8, 4, 4)
_ORIENTATION_BINS = 8
_TILE = 48
#: colour histogram + 4 cells of orientations + (log aspect, area share, centre x, centre y, box w, box h)
FEATURE_DIM = int(np.prod(_HSV_BINS)) + 4 * _ORIENTATION_BINS + 6

Box = tuple[float, float, float, float]


def sleeves_of(category: str) -> str | None:
    """Sleeve kind implied by a category *name* (DeepFashion2's names carry it), or None.

    The name is whatever the caller was given: a classifier's or detector's prediction by default, the
    annotation only under the explicit oracle.
    """
    name = category.lower()
    if "short sleeve" in name:
        return "short"
    if "long sleeve" in name:
        return "long"
    if "vest" in name:
        return "none"
    if "sling" in name:
        return "straps"
    return None


def _box_in(image: Image.Image, box: Box | None) -> tuple[int, int, int, int]:
    if box is None:
        return 0, 0, image.width, image.height
    x1, y1, x2, y2 = (float(v) for v in box)
    left = min(max(0, int(np.floor(x1))), image.width - 1)
    top = min(max(0, int(np.floor(y1))), image.height - 1)
    right = max(min(image.width, int(np.ceil(x2))), left + 1)
    bottom = max(min(image.height, int(np.ceil(y2))), top + 1)
    return left, top, right, bottom


def pixel_features(image: Image.Image, box: Box | None) -> np.ndarray:
    """``[FEATURE_DIM]`` float32 descriptor of the item in ``box`` of the full ``image`` (see module docstring)."""
    left, top, right, bottom = _box_in(image, box)
    tile = image.convert("RGB").crop((left, top, right, bottom))
    tile = tile.resize((_TILE, _TILE), Image.Resampling.BILINEAR)
    colour = np.sqrt(hsv_histogram(tile, _HSV_BINS))
    texture = np.sqrt(orientation_histogram(tile, _ORIENTATION_BINS))
    width, height = float(image.width), float(image.height)
    bw, bh = float(right - left), float(bottom - top)
    geometry = np.array(
        [
            np.log(bh / bw),
            (bw * bh) / (width * height),
            (left + right) / 2.0 / width,
            (top + bottom) / 2.0 / height,
            bw / width,
            bh / height,
        ]
    )
    return np.concatenate([colour, texture, geometry]).astype(np.float32)


@dataclass(frozen=True)
class CategoryPrediction:
    """The predicted category name of one item and the model's probability for it."""

    name: str
    score: float


class CategoryModel(nn.Module):
    """Standardised pixel features -> linear layer (``hidden=0``, multinomial logistic regression) or MLP."""

    mean: torch.Tensor  # buffers: feature standardisation fitted on the training rows
    std: torch.Tensor

    def __init__(self, *, classes: Sequence[str], hidden: int = 0, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        if len(classes) < 2:
            raise ConfigError(f"a category model needs at least 2 classes, got {list(classes)}")
        if hidden < 0:
            raise ConfigError(f"hidden must be >= 0, got {hidden}")
        self.classes = list(classes)
        self.hidden = hidden
        self.feature_dim = feature_dim
        self.kind = "pixel-mlp"
        self.metrics: dict[str, Any] = {}
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))
        if hidden:
            self.head: nn.Module = nn.Sequential(
                nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, len(classes))
            )
        else:
            self.head = nn.Linear(feature_dim, len(classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head((features - self.mean) / self.std)

    @torch.no_grad()
    def predict_features(self, features: np.ndarray) -> list[CategoryPrediction]:
        if len(features) == 0:
            return []
        probs = torch.softmax(self(torch.as_tensor(features, dtype=torch.float32)), dim=-1)
        score, index = probs.max(dim=-1)
        return [CategoryPrediction(self.classes[i], float(s)) for i, s in zip(index.tolist(), score.tolist())]

    def predict(self, images: Sequence[Image.Image], boxes: Sequence[Box | None]) -> list[CategoryPrediction]:
        """Category of the item in each (full image, box)."""
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images for {len(boxes)} boxes")
        if not images:
            return []
        return self.predict_features(np.stack([pixel_features(im, b) for im, b in zip(images, boxes)]))

    def describe(self) -> dict[str, Any]:
        """Provenance written into every caption record that used this model."""
        return {"kind": self.kind, "feature_version": FEATURE_VERSION, "hidden": self.hidden,
                "classes": len(self.classes), **{k: v for k, v in self.metrics.items() if k == "heldout_accuracy"}}  # fmt: skip

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))
        atomic_write_json(
            directory / CATEGORY_MODEL_FILE,
            {
                "kind": self.kind,
                "feature_version": FEATURE_VERSION,
                "classes": self.classes,
                "hidden": self.hidden,
                "feature_dim": self.feature_dim,
                "metrics": self.metrics,
            },  # fmt: skip
            indent=2,
        )
        return directory


_CATEGORY_MODELS: Registry[CategoryModel] = Registry("category model")


def register_category_model(
    name: str,
) -> Callable[[Callable[..., CategoryModel]], Callable[..., CategoryModel]]:
    return _CATEGORY_MODELS.register(name)


def create_category_model(name: str, **kwargs: Any) -> CategoryModel:
    """Build the category model ``name``; unknown names list the valid ones."""
    return _CATEGORY_MODELS.create(name, **kwargs)


def list_category_models() -> list[str]:
    return _CATEGORY_MODELS.names()


register_category_model("pixel-mlp")(CategoryModel)


def load_category_model(directory: str | Path) -> CategoryModel:
    """A model saved by :meth:`CategoryModel.save` (safetensors only; never unpickles)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    sidecar = directory / CATEGORY_MODEL_FILE
    if not sidecar.is_file():
        raise IncompleteCheckpointError(f"{sidecar} does not exist (not a category-model folder)")
    meta = json.loads(sidecar.read_text())
    if meta.get("feature_version") != FEATURE_VERSION:
        raise CheckpointError(
            f"{sidecar}: feature_version {meta.get('feature_version')!r} is not {FEATURE_VERSION!r}; retrain it"
        )
    model = create_category_model(
        meta.get("kind", "pixel-mlp"),
        classes=meta["classes"],
        hidden=int(meta.get("hidden", 0)),
        feature_dim=int(meta.get("feature_dim", FEATURE_DIM)),
    )
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    model.metrics = dict(meta.get("metrics", {}))
    return model.eval()


@dataclass(frozen=True)
class MlpTraining:
    """How a ``pixel-mlp`` category model is trained; one value serves the reported model and every
    cross-fitted fold, so their hyperparameters cannot drift apart."""

    hidden: int = 64  # hidden units (0 = a linear classifier)
    epochs: int = 300  # full-batch AdamW epochs (a time budget may stop it earlier)
    lr: float = 1e-2  # AdamW learning rate
    weight_decay: float = 1e-3  # AdamW decoupled weight decay


def _label_tensors(
    features: np.ndarray, labels: Sequence[str]
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The sorted class names, the float32 feature matrix and the class index of every row."""
    classes = sorted(set(labels))
    inputs = torch.as_tensor(np.asarray(features, dtype=np.float32))
    target = torch.tensor([classes.index(label) for label in labels], dtype=torch.long)
    return classes, inputs, target


def _fit_mlp(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    classes: Sequence[str],
    training: MlpTraining,
    seed: int,
    max_seconds: float | None,
) -> tuple[CategoryModel, int]:
    """A fresh ``pixel-mlp`` (seeded) trained by full-batch AdamW; returns it and the epochs run (a time budget
    may stop it early).

    Runs on one intra-op thread: the matrices are tiny, and on a busy shared CPU extra OpenMP threads only wait
    for each other (measured 4x slower with 2 threads than with 1 on a loaded 2-core machine).
    """
    torch.manual_seed(seed)
    model = create_category_model("pixel-mlp", classes=classes, hidden=training.hidden)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return model, _train_loop(model, features, labels, training=training, max_seconds=max_seconds)
    finally:
        torch.set_num_threads(threads)


def _train_loop(
    model: CategoryModel,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    training: MlpTraining,
    max_seconds: float | None,
) -> int:
    model.mean.copy_(features.mean(0))
    model.std.copy_(features.std(0).clamp_min(1e-4))
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


def target_features(
    images: Sequence[Callable[[], Image.Image]],
    boxes: Sequence[Box | None],
    image_keys: Sequence[str],
    *,
    progress: bool = False,
) -> np.ndarray:
    """``[N, FEATURE_DIM]`` features of N items; an image is opened once for consecutive items that share its
    ``image_keys`` entry (DeepFashion2: the item key without its item index)."""
    from tqdm.auto import tqdm

    rows = []
    current: tuple[str, Image.Image] | None = None
    for loader, box, image_key in tqdm(
        list(zip(images, boxes, image_keys)), desc="category features", unit="item", disable=not progress
    ):
        if current is None or current[0] != image_key:
            current = (image_key, loader())
        rows.append(pixel_features(current[1], box))
    return np.stack(rows) if rows else np.zeros((0, FEATURE_DIM), np.float32)


def fit_category_model(
    *,
    features: np.ndarray,
    labels: Sequence[str],
    groups: Sequence[Any],
    heldout_fraction: float = 0.2,
    training: MlpTraining | None = None,
    seed: int = 0,
    max_seconds: float | None = 30.0,
) -> CategoryModel:
    """Train a ``pixel-mlp`` category model and measure its accuracy on held-out groups.

    Args:
        features: :func:`pixel_features` rows of the training items.
        labels: the category names (training supervision from the *train* split's annotation).
        groups: a group per item (DeepFashion2: the identity ``(pair_id, style)``); held-out items come from
            whole groups, so the accuracy is measured on garments the model never saw.
        heldout_fraction: share of groups held out for the reported accuracy (0 = none, no accuracy).
        training: the model size and optimisation (default :class:`MlpTraining`).
        max_seconds: time budget of the optimisation.

    Returns:
        The model trained on the non-held-out items, with ``metrics`` holding ``heldout_accuracy``,
        ``train_accuracy``, the majority-class and chance accuracies, the item counts and ``seconds``.
    """
    if not len(features) == len(labels) == len(groups):
        raise ValueError(
            f"{len(features)} feature rows, {len(labels)} labels and {len(groups)} groups differ"
        )
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    start = time.perf_counter()
    classes, inputs, target = _label_tensors(features, labels)
    unique_groups = sorted(set(groups), key=repr)
    order = np.random.default_rng(seed).permutation(len(unique_groups))
    n_held = int(round(heldout_fraction * len(unique_groups)))
    held_groups = {unique_groups[i] for i in order[:n_held]}
    held = torch.tensor([g in held_groups for g in groups], dtype=torch.bool)
    if bool(held.all()):
        raise ConfigError("every item is held out; lower heldout_fraction")
    model, epochs_run = _fit_mlp(
        inputs[~held],
        target[~held],
        classes=classes,
        training=training or MlpTraining(),
        seed=seed,
        max_seconds=max_seconds,
    )
    with torch.no_grad():
        correct = model(inputs).argmax(-1) == target
    majority = torch.bincount(target[~held], minlength=len(classes)).argmax()
    model.metrics = {
        "train_items": int((~held).sum()),
        "heldout_items": int(held.sum()),
        "heldout_groups": n_held,
        "train_accuracy": float(correct[~held].float().mean()),
        "heldout_accuracy": float(correct[held].float().mean()) if bool(held.any()) else None,
        "majority_class_heldout_accuracy": (
            float((target[held] == majority).float().mean()) if bool(held.any()) else None
        ),
        "chance_accuracy": 1.0 / len(classes),
        "epochs": epochs_run,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return model


def category_model_dir(store: str | Path) -> Path:
    """Where a category model trained for a caption store is saved: ``captions.train.jsonl`` ->
    ``captions.train.category_model/`` (beside the captions it produced)."""
    return beside_store(store, ".category_model")


def cross_fitted_predictions(
    *,
    features: np.ndarray,
    labels: Sequence[str],
    groups: Sequence[Any],
    folds: int = 5,
    training: MlpTraining | None = None,
    seed: int = 0,
    max_seconds: float | None = None,
) -> list[CategoryPrediction]:
    """Out-of-fold predictions: every item's category predicted by a model that never saw its group.

    A caption of a *training* item must not name a category the classifier memorised (100% right on its own
    training items) when the captions of new items name a category it guessed: the retrieval model would learn
    to trust a word that is wrong at test time. Cross-fitting (stacking) gives training captions exactly the
    error rate of unseen items.
    """
    if folds < 2:
        raise ConfigError(f"folds must be >= 2, got {folds}")
    unique_groups = sorted(set(groups), key=repr)
    order = np.random.default_rng([seed, 2]).permutation(len(unique_groups))
    fold_of_group = {unique_groups[g]: i % folds for i, g in enumerate(order)}
    fold = np.array([fold_of_group[g] for g in groups])
    classes, inputs, target = _label_tensors(features, labels)
    out: list[CategoryPrediction | None] = [None] * len(labels)
    start = time.perf_counter()
    for index in range(folds):
        test = torch.as_tensor(fold == index)
        if not bool(test.any()) or bool(test.all()):
            continue
        left = None
        if max_seconds is not None:
            left = max(0.5, (max_seconds - (time.perf_counter() - start)) / (folds - index))
        model, _ = _fit_mlp(
            inputs[~test],
            target[~test],
            classes=classes,
            training=training or MlpTraining(),
            seed=seed + index,
            max_seconds=left,
        )
        for i, prediction in zip(
            np.flatnonzero(fold == index), model.predict_features(features[fold == index])
        ):
            out[int(i)] = prediction
    if any(p is None for p in out):
        raise DataError(f"cross-fitting needs at least 2 groups with items, got {len(unique_groups)}")
    return [p for p in out if p is not None]


def fit_category_model_on_targets(
    targets: Sequence[CaptionTarget],
    *,
    out_dir: str | Path,
    heldout_fraction: float = 0.2,
    folds: int = 5,
    seed: int = 0,
    max_seconds: float | None = 30.0,
    progress: bool = False,
) -> tuple[CategoryModel, dict[str, CategoryPrediction]]:
    """Train a category model on caption targets that carry an annotated ``category_name`` (a *train* split).

    Returns the model (fitted with whole identities, ``annotation["identity"]`` else the image, held out for the
    reported ``heldout_accuracy``; saved to ``out_dir``) and the cross-fitted predictions for these targets
    (:func:`cross_fitted_predictions`), which their captions should use instead of the model's own (memorised)
    predictions. Targets without an annotated category are skipped.
    """
    usable = [t for t in targets if t.annotation.get("category_name")]
    if len(usable) < 2:
        raise DataError(
            f"training a category model needs annotated categories; {len(usable)} of {len(targets)} targets have one"
        )
    start = time.perf_counter()
    features = target_features(
        [t.open_image for t in usable],
        [t.bbox for t in usable],
        [t.key.rsplit("/", 1)[0] for t in usable],
        progress=progress,
    )
    labels = [str(t.annotation["category_name"]) for t in usable]
    groups = [repr(t.annotation.get("identity", t.key.rsplit("/", 1)[0])) for t in usable]
    left = None if max_seconds is None else max(1.0, (max_seconds - (time.perf_counter() - start)) / 2)
    model = fit_category_model(
        features=features,
        labels=labels,
        groups=groups,
        heldout_fraction=heldout_fraction,
        seed=seed,
        max_seconds=left,
    )
    folds = min(folds, len(set(groups)))
    oof = cross_fitted_predictions(features=features, labels=labels, groups=groups, folds=folds, seed=seed,
                                   max_seconds=left)  # fmt: skip
    model.metrics["cross_fitted_accuracy"] = float(np.mean([p.name == y for p, y in zip(oof, labels)]))
    model.metrics["seconds_with_features"] = round(time.perf_counter() - start, 2)
    model.save(out_dir)
    return model, {t.key: p for t, p in zip(usable, oof)}
