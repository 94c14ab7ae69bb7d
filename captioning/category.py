"""Garment-category classifiers, so captions can name the category without reading the annotation.

Captions must be functions of the pixels and the item box (DESIGN.md "No oracle by default"): the dataset's
``category_name`` would otherwise reach every caption of queries and gallery alike and turn a caption
experiment into a category oracle. The template backend and the questioner prompts therefore get the category
from a model: a classifier trained on the *train* split's crops (the annotation is its supervision, as for any
trained model) and applied to every split, or a detector's class when one is used.

Two kinds are registered (:func:`create_category_model`), both saved as safetensors plus a JSON sidecar
(kind, input version, classes, architecture, metrics) beside the captions they produced:

- ``pixel-cnn`` (:mod:`captioning.category_cnn`, the quickstart's): a K-fold ensemble of small conv nets on the
  stretched item crop and the box geometry, trained with flip, colour and scale/shift augmentation so it
  learns silhouettes; its members' out-of-fold predictions caption the train items.
- ``pixel-mlp``: a hand-made descriptor of the crop (HSV joint colour histogram, 2x2-cell gradient-orientation
  histograms, as in the quickstart's baseline) plus box geometry (aspect ratio, area share and centre of the
  box in its image: tops sit high, trousers are tall) feeding a standardised linear layer or one-hidden-layer
  MLP trained full-batch with AdamW. CPU-cheap, but colour and four orientation cells cannot name 13
  silhouettes (about 0.2 validation accuracy on the garment world).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from capret.data.pixel_stats import hsv_histogram, orientation_histogram
from capret.errors import CheckpointError, ConfigError, DataError, IncompleteCheckpointError, UnknownNameError
from capret.io import atomic_write_json
from capret.registry import Registry
from captioning.store import beside_store

if TYPE_CHECKING:
    from captioning.sources import CaptionTarget

__all__ = [
    "CATEGORY_MODEL_FILE",
    "FEATURE_VERSION",
    "GEOMETRY_DIM",
    "CategoryModel",
    "CategoryPrediction",
    "LabelledRows",
    "MlpTraining",
    "PixelMlpModel",
    "accuracy_metrics",
    "box_geometry",
    "box_in",
    "category_model_dir",
    "create_category_model",
    "cross_fitted_predictions",
    "fit_category_model",
    "fit_category_model_on_targets",
    "list_category_models",
    "load_category_model",
    "one_thread",
    "pixel_features",
    "register_category_model",
    "register_category_trainer",
    "sleeves_of",
    "target_features",
]

CATEGORY_MODEL_FILE = "category_model.json"
FEATURE_VERSION = "capret-pixfeat-v1"

_HSV_BINS = (8, 4, 4)
_ORIENTATION_BINS = 8
_TILE = 48
#: box geometry: log aspect, area share, centre x, centre y, box w, box h (all relative to the image)
GEOMETRY_DIM = 6
#: colour histogram + 4 cells of orientations + box geometry
FEATURE_DIM = int(np.prod(_HSV_BINS)) + 4 * _ORIENTATION_BINS + GEOMETRY_DIM

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


def box_in(image: Image.Image, box: Box | None) -> tuple[int, int, int, int]:
    """The box as whole pixels inside the image, at least one pixel wide and high (None: the whole image)."""
    if box is None:
        return 0, 0, image.width, image.height
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite(v) for v in (x1, y1, x2, y2)):
        raise DataError(f"box {box!r} has a non-finite coordinate")
    left = min(max(0, int(np.floor(x1))), image.width - 1)
    top = min(max(0, int(np.floor(y1))), image.height - 1)
    right = max(min(image.width, int(np.ceil(x2))), left + 1)
    bottom = max(min(image.height, int(np.ceil(y2))), top + 1)
    return left, top, right, bottom


def box_geometry(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    """``[GEOMETRY_DIM]`` float32: log aspect ratio, area share, centre x and y, width and height of a
    :func:`box_in` box, relative to the image (tops sit high, trousers are tall)."""
    left, top, right, bottom = box
    width, height = float(image.width), float(image.height)
    bw, bh = float(right - left), float(bottom - top)
    return np.array(
        [np.log(bh / bw), (bw * bh) / (width * height), (left + right) / 2.0 / width,
         (top + bottom) / 2.0 / height, bw / width, bh / height],
        dtype=np.float32,
    )  # fmt: skip


def pixel_features(image: Image.Image, box: Box | None) -> np.ndarray:
    """``[FEATURE_DIM]`` float32 descriptor of the item in ``box`` of the full ``image`` (see module docstring)."""
    inside = box_in(image, box)
    tile = image.convert("RGB").crop(inside)
    tile = tile.resize((_TILE, _TILE), Image.Resampling.BILINEAR)
    colour = np.sqrt(hsv_histogram(tile, _HSV_BINS))
    texture = np.sqrt(orientation_histogram(tile, _ORIENTATION_BINS))
    return np.concatenate([colour, texture, box_geometry(image, inside)]).astype(np.float32)


@dataclass(frozen=True)
class CategoryPrediction:
    """The predicted category name of one item and the model's probability for it."""

    name: str
    score: float


class CategoryModel(nn.Module):
    """Base of every registered category model: names the item in (full image, box) from its pixels alone.

    A subclass turns (image, box) pairs into its own input rows (:meth:`encode`: hand-made features for
    ``pixel-mlp``, crops for ``pixel-cnn``) and rows into class probabilities (:meth:`probabilities`); saving,
    loading, provenance and the prediction records are shared, so the caption runner and the quickstart treat
    every kind alike. The constructor arguments besides ``classes`` are the :meth:`config` written to the
    sidecar, so :func:`load_category_model` rebuilds the same architecture before loading the weights.
    """

    kind = "base"
    version = "none"  # the input/feature version; a saved model of another version is refused
    mean: (
        torch.Tensor
    )  # buffers: standardisation of the ``standardised`` numeric inputs, fitted on training rows
    std: torch.Tensor

    def __init__(self, *, classes: Sequence[str], standardised: int) -> None:
        super().__init__()
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ConfigError(f"a category model needs at least 2 distinct classes, got {list(classes)}")
        self.classes = list(classes)
        self.metrics: dict[str, Any] = {}
        self.register_buffer("mean", torch.zeros(standardised))
        self.register_buffer("std", torch.ones(standardised))

    def fit_standardisation(self, values: torch.Tensor) -> None:
        """Set :attr:`mean` and :attr:`std` from the training rows' numeric inputs ``[N, standardised]``."""
        self.mean.copy_(values.mean(0))
        self.std.copy_(values.std(0).clamp_min(1e-4))

    def config(self) -> dict[str, Any]:
        """Constructor arguments (besides ``classes``) that rebuild this architecture."""
        raise NotImplementedError

    def encode(self, images: Sequence[Image.Image], boxes: Sequence[Box | None]) -> Any:
        """This kind's input rows of the items in (full image, box) pairs."""
        raise NotImplementedError

    def probabilities(self, inputs: Any) -> torch.Tensor:
        """``[N, len(classes)]`` class probabilities of encoded rows."""
        raise NotImplementedError

    @torch.no_grad()
    def predict_inputs(self, inputs: Any) -> list[CategoryPrediction]:
        """The most probable category of every encoded row."""
        if len(inputs) == 0:
            return []
        score, index = self.probabilities(inputs).max(dim=-1)
        return [CategoryPrediction(self.classes[i], float(s)) for i, s in zip(index.tolist(), score.tolist())]

    def predict(self, images: Sequence[Image.Image], boxes: Sequence[Box | None]) -> list[CategoryPrediction]:
        """Category of the item in each (full image, box)."""
        if len(images) != len(boxes):
            raise DataError(f"{len(images)} images for {len(boxes)} boxes: give one box (or None) per image")
        if not images:
            return []
        return self.predict_inputs(self.encode(images, boxes))

    def describe(self) -> dict[str, Any]:
        """Provenance written into every caption record that used this model."""
        held = {k: v for k, v in self.metrics.items() if k == "heldout_accuracy"}
        return {"kind": self.kind, "feature_version": self.version, **self.config(), "classes": len(self.classes),
                **held}  # fmt: skip

    def save(self, directory: str | Path) -> Path:
        """Weights as ``model.safetensors`` plus the JSON sidecar (kind, version, classes, config, metrics)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))
        atomic_write_json(
            directory / CATEGORY_MODEL_FILE,
            {
                "kind": self.kind,
                "feature_version": self.version,
                "classes": self.classes,
                "config": self.config(),
                "metrics": self.metrics,
            },  # fmt: skip
            indent=2,
        )
        return directory


_CATEGORY_MODELS: Registry[CategoryModel] = Registry(
    "category model", lazy_modules={"pixel-cnn": "captioning.category_cnn"}
)


def register_category_model(
    name: str,
) -> Callable[[Callable[..., CategoryModel]], Callable[..., CategoryModel]]:
    return _CATEGORY_MODELS.register(name)


def create_category_model(name: str, **kwargs: Any) -> CategoryModel:
    """Build the category model ``name``; unknown names list the valid ones."""
    return _CATEGORY_MODELS.create(name, **kwargs)


def list_category_models() -> list[str]:
    return _CATEGORY_MODELS.names()


#: A category model kind that trains its own way from images (not from pixel-statistics rows) registers a
#: trainer here: ``trainer(images=, boxes=, image_keys=, labels=, groups=, training=, folds=, seed=, max_seconds=,
#: progress=) -> (model, out-of-fold predictions)``. Lazy, like the models: this module never imports theirs.
_TRAINERS: Registry[tuple[CategoryModel, list[CategoryPrediction]]] = Registry(
    "category model trainer", lazy_modules={"pixel-cnn": "captioning.category_cnn"}
)


def register_category_trainer(
    name: str,
) -> Callable[
    [Callable[..., tuple[CategoryModel, list[CategoryPrediction]]]],
    Callable[..., tuple[CategoryModel, list[CategoryPrediction]]],
]:
    return _TRAINERS.register(name)


class PixelMlpModel(CategoryModel):
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

    def encode(self, images: Sequence[Image.Image], boxes: Sequence[Box | None]) -> np.ndarray:
        return np.stack([pixel_features(im, b) for im, b in zip(images, boxes)])

    def probabilities(self, inputs: Any) -> torch.Tensor:
        return torch.softmax(self(torch.as_tensor(inputs, dtype=torch.float32)), dim=-1)


register_category_model("pixel-mlp")(PixelMlpModel)


def load_category_model(directory: str | Path) -> CategoryModel:
    """A model saved by :meth:`CategoryModel.save` (safetensors only; never unpickles)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    sidecar = directory / CATEGORY_MODEL_FILE
    if not sidecar.is_file():
        raise IncompleteCheckpointError(f"{sidecar} does not exist (not a category-model folder)")
    meta = json.loads(sidecar.read_text())
    kind = meta.get("kind", "pixel-mlp")
    # sidecars written before the "config" key held the pixel-mlp's two arguments at the top level
    config = meta.get("config") or {"hidden": int(meta.get("hidden", 0)),
                                    "feature_dim": int(meta.get("feature_dim", FEATURE_DIM))}  # fmt: skip
    model = create_category_model(kind, classes=meta["classes"], **config)
    if meta.get("feature_version") != model.version:
        raise CheckpointError(
            f"{sidecar}: feature_version {meta.get('feature_version')!r} is not {model.version!r} "
            f"(kind {kind!r}); retrain it"
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


@dataclass(frozen=True)
class LabelledRows:
    """Training rows of a category model: one input row, category name and group per item.

    ``inputs`` are what the model kind's :meth:`CategoryModel.encode` returns (a feature matrix for
    ``pixel-mlp``, crops for ``pixel-cnn``); ``groups`` name the item's garment (DeepFashion2: the identity
    ``(pair_id, style)``), so held-out and out-of-fold items are always whole garments the model never saw.
    """

    inputs: Any
    labels: Sequence[str]
    groups: Sequence[Any]

    def __post_init__(self) -> None:
        if not len(self.inputs) == len(self.labels) == len(self.groups):
            raise DataError(
                f"{len(self.inputs)} input rows, {len(self.labels)} labels and {len(self.groups)} groups differ"
            )

    def classes_and_targets(self) -> tuple[list[str], torch.Tensor]:
        """The sorted class names and the class index of every row."""
        classes = sorted(set(self.labels))
        return classes, torch.tensor([classes.index(label) for label in self.labels], dtype=torch.long)

    def group_folds(self, folds: int, *, seed: int) -> np.ndarray:
        """``[N]`` fold index of every row: whole groups dealt round-robin over ``folds`` in a seeded order."""
        unique = sorted(set(self.groups), key=repr)
        order = np.random.default_rng([seed, 2]).permutation(len(unique))
        fold_of_group = {unique[g]: i % folds for i, g in enumerate(order)}
        return np.array([fold_of_group[g] for g in self.groups], dtype=np.int64)


@contextmanager
def one_thread() -> Iterator[None]:
    """Train on one intra-op thread: the models are tiny, and on a busy shared CPU extra OpenMP threads only
    wait for each other (measured 4x slower with 2 threads than with 1 on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    with one_thread():
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


def target_features(
    images: Sequence[Callable[[], Image.Image]],
    boxes: Sequence[Box | None],
    image_keys: Sequence[str],
    *,
    encode: Callable[[Image.Image, Box | None], Any] = pixel_features,
    progress: bool = False,
) -> list[Any]:
    """One ``encode(image, box)`` row per item (default :func:`pixel_features`); an image is opened once for
    consecutive items that share its ``image_keys`` entry (DeepFashion2: the item key without its item index)."""
    from tqdm.auto import tqdm

    rows = []
    current: tuple[str, Image.Image] | None = None
    for loader, box, image_key in tqdm(
        list(zip(images, boxes, image_keys)), desc="category inputs", unit="item", disable=not progress
    ):
        if current is None or current[0] != image_key:
            current = (image_key, loader())
        rows.append(encode(current[1], box))
    return rows


def fit_category_model(
    rows: LabelledRows,
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


def category_model_dir(store: str | Path) -> Path:
    """Where a category model trained for a caption store is saved: ``captions.train.jsonl`` ->
    ``captions.train.category_model/`` (beside the captions it produced)."""
    return beside_store(store, ".category_model")


def cross_fitted_predictions(
    rows: LabelledRows,
    *,
    folds: int = 5,
    training: MlpTraining | None = None,
    seed: int = 0,
    max_seconds: float | None = None,
) -> list[CategoryPrediction]:
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
    out: list[CategoryPrediction | None] = [None] * len(rows.labels)
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


def fit_category_model_on_targets(
    targets: Sequence[CaptionTarget],
    *,
    out_dir: str | Path,
    kind: str = "pixel-mlp",
    cnn_training: Any = None,
    heldout_fraction: float = 0.2,
    folds: int | None = None,
    seed: int = 0,
    max_seconds: float | None = 30.0,
    progress: bool = False,
) -> tuple[CategoryModel, dict[str, CategoryPrediction]]:
    """Train a category model of ``kind`` on caption targets that carry an annotated ``category_name`` (a
    *train* split).

    Returns the model (saved to ``out_dir``) and cross-fitted predictions for these targets, which their
    captions should use instead of the model's own (memorised) predictions. Groups are whole identities
    (``annotation["identity"]``, else the image). Targets without an annotated category are skipped.

    ``pixel-mlp``: the reported model is fitted with ``heldout_fraction`` of the groups held out for its
    ``heldout_accuracy``, and ``folds`` (default 5) more models give the out-of-fold predictions
    (:func:`cross_fitted_predictions`). ``pixel-cnn``: ``folds`` members, one per fold, each trained on the
    other folds, give the out-of-fold predictions and together are the model
    (:func:`captioning.category_cnn.fit_cnn_category_model`, trained as ``cnn_training`` says, with ``folds``
    members if given; ``heldout_fraction`` is not used). ``max_seconds`` covers the input extraction and all fitting.
    """
    usable = [t for t in targets if t.annotation.get("category_name")]
    if len(usable) < 2:
        raise DataError(
            f"training a category model needs annotated categories; {len(usable)} of {len(targets)} targets have one"
        )
    if kind not in list_category_models():
        raise UnknownNameError(
            f"unknown category model {kind!r}; valid names: {', '.join(list_category_models())}"
        )
    start = time.perf_counter()
    images = [t.open_image for t in usable]
    boxes = [t.bbox for t in usable]
    image_keys = [t.key.rsplit("/", 1)[0] for t in usable]
    labels = [str(t.annotation["category_name"]) for t in usable]
    groups = [repr(t.annotation.get("identity", t.key.rsplit("/", 1)[0])) for t in usable]
    model: CategoryModel
    if kind in _TRAINERS.names():
        model, oof = _TRAINERS.create(
            kind,
            images=images,
            boxes=boxes,
            image_keys=image_keys,
            labels=labels,
            groups=groups,
            training=cnn_training,
            folds=folds,
            seed=seed,
            max_seconds=max_seconds,
            progress=progress,
        )
    else:
        features = np.stack(target_features(images, boxes, image_keys, progress=progress))
        data = LabelledRows(features, labels, groups)
        left = None if max_seconds is None else max(1.0, (max_seconds - (time.perf_counter() - start)) / 2)
        model = fit_category_model(data, heldout_fraction=heldout_fraction, seed=seed, max_seconds=left)
        folds = min(folds or 5, len(set(groups)))
        oof = cross_fitted_predictions(data, folds=folds, seed=seed, max_seconds=left)
    model.metrics["cross_fitted_accuracy"] = float(np.mean([p.name == y for p, y in zip(oof, labels)]))
    model.metrics["seconds_with_features"] = round(time.perf_counter() - start, 2)
    model.save(out_dir)
    return model, {t.key: p for t, p in zip(usable, oof)}
