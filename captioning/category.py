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
- ``pixel-mlp`` (:mod:`captioning.category_mlp`): a hand-made colour/orientation descriptor of the crop plus
  the box geometry into a linear layer or small MLP; CPU-cheap, but it cannot name 13 silhouettes (about 0.2
  validation accuracy on the garment world).

This module holds what every kind shares: the base class, the registries of models and trainers (each kind's
module is imported on first use), loading, and :func:`fit_category_model_on_targets`.
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

from capret.errors import CheckpointError, ConfigError, DataError, IncompleteCheckpointError, UnknownNameError
from capret.io import atomic_write_json
from capret.registry import Registry
from captioning.store import beside_store

if TYPE_CHECKING:
    from captioning.sources import CaptionTarget

__all__ = [
    "CATEGORY_MODEL_FILE",
    "GEOMETRY_DIM",
    "CategoryModel",
    "CategoryPrediction",
    "LabelledRows",
    "box_geometry",
    "box_in",
    "category_model_dir",
    "create_category_model",
    "fit_category_model_on_targets",
    "list_category_models",
    "load_category_model",
    "one_thread",
    "register_category_model",
    "register_category_trainer",
    "sleeves_of",
    "target_features",
]

CATEGORY_MODEL_FILE = "category_model.json"
#: box geometry: log aspect, area share, centre x, centre y, box w, box h (all relative to the image)
GEOMETRY_DIM = 6

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


#: the modules that register each kind (imported on first use: this module never imports them)
_KIND_MODULES = {"pixel-cnn": "captioning.category_cnn", "pixel-mlp": "captioning.category_mlp"}
_CATEGORY_MODELS: Registry[CategoryModel] = Registry("category model", lazy_modules=_KIND_MODULES)


def register_category_model(
    name: str,
) -> Callable[[Callable[..., CategoryModel]], Callable[..., CategoryModel]]:
    return _CATEGORY_MODELS.register(name)


def create_category_model(name: str, **kwargs: Any) -> CategoryModel:
    """Build the category model ``name``; unknown names list the valid ones."""
    return _CATEGORY_MODELS.create(name, **kwargs)


def list_category_models() -> list[str]:
    return _CATEGORY_MODELS.names()


#: Every category model kind registers how it trains from caption targets here: ``trainer(images=, boxes=,
#: image_keys=, labels=, groups=, training=, heldout_fraction=, folds=, seed=, max_seconds=, progress=) -> (model,
#: out-of-fold predictions)`` (``training`` is the kind's own settings object; a kind may ignore
#: ``heldout_fraction``). Lazy, like the models.
_TRAINERS: Registry[tuple[CategoryModel, list[CategoryPrediction]]] = Registry(
    "category model trainer", lazy_modules=_KIND_MODULES
)


def register_category_trainer(
    name: str,
) -> Callable[
    [Callable[..., tuple[CategoryModel, list[CategoryPrediction]]]],
    Callable[..., tuple[CategoryModel, list[CategoryPrediction]]],
]:
    return _TRAINERS.register(name)


def load_category_model(directory: str | Path) -> CategoryModel:
    """A model saved by :meth:`CategoryModel.save` (safetensors only; never unpickles)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    sidecar = directory / CATEGORY_MODEL_FILE
    if not sidecar.is_file():
        raise IncompleteCheckpointError(f"{sidecar} does not exist (not a category-model folder)")
    meta = json.loads(sidecar.read_text())
    kind = meta.get("kind", "pixel-mlp")
    # sidecars written before the "config" key held the pixel-mlp's arguments at the top level
    config = meta.get("config") or {k: int(meta[k]) for k in ("hidden", "feature_dim") if k in meta}
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


def target_features(
    images: Sequence[Callable[[], Image.Image]],
    boxes: Sequence[Box | None],
    image_keys: Sequence[str],
    *,
    encode: Callable[[Image.Image, Box | None], Any],
    progress: bool = False,
) -> list[Any]:
    """One ``encode(image, box)`` row per item (the kind's own input row); an image is opened once for
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


def category_model_dir(store: str | Path) -> Path:
    """Where a category model trained for a caption store is saved: ``captions.train.jsonl`` ->
    ``captions.train.category_model/`` (beside the captions it produced)."""
    return beside_store(store, ".category_model")


def fit_category_model_on_targets(
    targets: Sequence[CaptionTarget],
    *,
    out_dir: str | Path,
    kind: str = "pixel-mlp",
    training: Any = None,
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

    Each kind trains as its registered trainer says, with ``training`` (the kind's settings; default its own):
    ``pixel-mlp`` (:mod:`captioning.category_mlp`, ``MlpTraining``): the reported model is fitted with
    ``heldout_fraction`` of the groups held out for its ``heldout_accuracy``, and ``folds`` (default 5) more
    models give the out-of-fold predictions. ``pixel-cnn`` (:mod:`captioning.category_cnn`, ``CnnTraining``):
    ``folds`` members, one per fold, each trained on the other folds, give the out-of-fold predictions and
    together are the model (``heldout_fraction`` is not used). ``max_seconds`` covers the input extraction and
    all fitting.
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
    model, oof = _TRAINERS.create(
        kind,
        images=images,
        boxes=boxes,
        image_keys=image_keys,
        labels=labels,
        groups=groups,
        training=training,
        heldout_fraction=heldout_fraction,
        folds=folds,
        seed=seed,
        max_seconds=max_seconds,
        progress=progress,
    )
    model.metrics["cross_fitted_accuracy"] = float(np.mean([p.name == y for p, y in zip(oof, labels)]))
    model.metrics["seconds_with_features"] = round(time.perf_counter() - start, 2)
    model.save(out_dir)
    return model, {t.key: p for t, p in zip(usable, oof)}
