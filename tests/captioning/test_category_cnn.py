"""The ``pixel-cnn`` category model: it learns garment silhouettes from rendered pixels (colour and print are
drawn independently of the category, so they cannot carry it), round-trips through safetensors, and refuses
bad inputs with typed errors naming the field and value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capret.data.garments.paint import Garment
from capret.data.garments.patterns import sample_look
from capret.data.garments.sampling import attributes_for
from capret.data.garments.scenes import shop_photo
from capret.errors import CheckpointError, ConfigError, DataError, UnknownNameError
from captioning.category import (
    CategoryModel,
    LabelledRows,
    create_category_model,
    fit_category_model_on_targets,
    list_category_models,
    load_category_model,
)
from captioning.category_cnn import (
    CnnInputs,
    CnnTraining,
    PixelCnnModel,
    _learning_rate,
    augment,
    fit_cnn_category_model,
    tile_inputs,
)
from captioning.sources import CaptionTarget

#: three categories a person tells apart by outline alone (leg split, flared hem, sleeved torso)
CATEGORIES = ("trousers", "skirt", "long sleeve top")
SMALL = CnnTraining(size=20, width=6, folds=3, steps=50, batch_size=16)


def _shop_photos(per_category: int, *, seed: int) -> list[tuple[Image.Image, tuple[float, ...], str, int]]:
    """Product photos of the garment world's renderer, every one its own identity with its own colours, print
    and details: (image, item box, category, identity)."""
    rng = np.random.default_rng(seed)
    photos = []
    for index in range(per_category * len(CATEGORIES)):
        category = CATEGORIES[index % len(CATEGORIES)]
        photo = shop_photo(Garment(attributes_for(category, rng), sample_look(rng)), size=64, rng=rng)
        photos.append((photo.image, tuple(float(v) for v in photo.items[0].bbox), category, index))
    return photos


@pytest.fixture(scope="module")
def photos() -> list[tuple[Image.Image, tuple[float, ...], str, int]]:
    return _shop_photos(14, seed=0)


def _rows(photos: list, training: CnnTraining) -> LabelledRows:
    tiles = [
        tile_inputs(image, box, size=training.size, margin=training.margin) for image, box, _, _ in photos
    ]
    return LabelledRows(
        CnnInputs.stack(tiles, size=training.size), [p[2] for p in photos], [p[3] for p in photos]
    )


def test_pixel_cnn_names_rendered_garments_it_never_saw_by_their_silhouette(photos, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, oof = fit_cnn_category_model(_rows(photos, SMALL), training=SMALL, seed=0)
    truth = [p[2] for p in photos]
    out_of_fold = float(np.mean([p.name == y for p, y in zip(oof, truth)]))
    # every prediction is by a member that never saw that garment; chance is 1/3
    assert model.metrics["heldout_accuracy"] == pytest.approx(out_of_fold)
    assert out_of_fold >= 0.6, model.metrics
    assert model.metrics["steps"] == [SMALL.steps] * SMALL.folds and len(model.members) == SMALL.folds
    new = _shop_photos(6, seed=1)  # garments from another draw of the renderer
    predicted = model.predict([p[0] for p in new], [p[1] for p in new])
    assert np.mean([p.name == q[2] for p, q in zip(predicted, new)]) >= 0.6
    assert all(0.0 < p.score <= 1.0 for p in predicted)

    model.save(tmp_path / "cnn")
    loaded = load_category_model(tmp_path / "cnn")
    assert isinstance(loaded, PixelCnnModel) and loaded.config() == model.config()
    assert loaded.predict([p[0] for p in new], [p[1] for p in new]) == predicted
    assert loaded.metrics == json.loads(json.dumps(model.metrics))
    assert loaded.describe()["kind"] == "pixel-cnn" and loaded.describe()["members"] == SMALL.folds


def test_pixel_cnn_is_registered_and_loads_lazily() -> None:
    assert {"pixel-cnn", "pixel-mlp"} <= set(list_category_models())
    model = create_category_model("pixel-cnn", classes=["a", "b"], size=20, width=2)
    assert isinstance(model, CategoryModel) and model.config() == {"size": 20, "width": 2, "margin": 0.08,
                                                                   "members": 1}  # fmt: skip
    with pytest.raises(UnknownNameError, match="pixel-cnn"):
        create_category_model("pixel-rnn", classes=["a", "b"])


def test_augmentation_keeps_shapes_and_mirrors_the_box_centre() -> None:
    tiles = torch.randint(0, 256, (64, 3, 20, 20), dtype=torch.uint8)
    geometry = torch.rand(64, 6)
    out, moved = augment(tiles, geometry, generator=torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 20, 20) and out.dtype == torch.float32
    flipped = ~torch.isclose(moved[:, 2], geometry[:, 2])
    assert 10 < int(flipped.sum()) < 54  # about half the rows are mirrored ...
    assert torch.allclose(moved[flipped, 2], 1.0 - geometry[flipped, 2])  # ... and their centre with them
    assert torch.equal(moved[:, [0, 1, 3, 4, 5]], geometry[:, [0, 1, 3, 4, 5]])
    again, _ = augment(tiles, geometry, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded


def test_erasing_paints_one_occluding_square_per_view() -> None:
    grey = torch.full((40, 3, 24, 24), 128, dtype=torch.uint8)  # every jitter keeps a flat tile flat ...
    geometry = torch.rand(40, 6)
    plain, _ = augment(grey, geometry, generator=torch.Generator().manual_seed(0), rotation=0.5)
    assert torch.allclose(plain, plain[:, :, :1, :1].expand_as(plain), atol=1e-5)
    erased, _ = augment(grey, geometry, generator=torch.Generator().manual_seed(0), erase=1.0)
    changed = (erased - erased[:, :, :1, :1]).abs().sum(
        1
    ) > 1e-4  # ... but for the occluder (or its complement)
    area = torch.minimum(changed.sum((1, 2)), (~changed).sum((1, 2)))
    assert int((area > 0).sum()) >= 36 and int(area.max()) <= 13 * 13


def test_learning_rate_warms_up_then_follows_its_schedule_and_the_clock() -> None:
    constant = CnnTraining(steps=100, warmup=10, lr=1e-2)
    assert _learning_rate(constant, step=0, elapsed=0.0, limit=None) == pytest.approx(1e-3)
    assert _learning_rate(constant, step=50, elapsed=99.0, limit=10.0) == pytest.approx(1e-2)
    cosine = CnnTraining(steps=100, warmup=10, lr=1e-2, schedule="cosine")
    assert _learning_rate(cosine, step=50, elapsed=0.0, limit=None) == pytest.approx(5e-3)
    # the clock ran out first: the cosine follows the larger of the step and the time progress
    assert _learning_rate(cosine, step=20, elapsed=5.0, limit=10.0) == pytest.approx(5e-3)
    assert _learning_rate(cosine, step=20, elapsed=12.0, limit=10.0) == pytest.approx(0.0, abs=1e-12)


def test_bad_inputs_name_the_field_and_value(photos, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"CnnTraining\.size must be >= 16, got 8"):
        CnnTraining(size=8)
    with pytest.raises(ConfigError, match=r"CnnTraining\.folds must be >= 2, got 1"):
        CnnTraining(folds=1)
    with pytest.raises(ConfigError, match=r"CnnTraining\.ema must be in \[0, 1\), got 1\.5"):
        CnnTraining(ema=1.5)
    with pytest.raises(ConfigError, match=r"CnnTraining\.rotation must be in \[0, pi\], got -0\.1"):
        CnnTraining(rotation=-0.1)
    with pytest.raises(ConfigError, match=r"CnnTraining\.erase must be in \[0, 1\], got 1\.5"):
        CnnTraining(erase=1.5)
    with pytest.raises(ConfigError, match=r"CnnTraining\.lr must be > 0, got 0\.0"):
        CnnTraining(lr=0.0)
    with pytest.raises(
        ConfigError, match=r"CnnTraining\.schedule must be 'cosine' or 'constant', got 'step'"
    ):
        CnnTraining(schedule="step")
    with pytest.raises(ConfigError, match="width must be >= 1, got 0"):
        PixelCnnModel(classes=["a", "b"], width=0)
    with pytest.raises(ConfigError, match="at least 2 distinct classes"):
        PixelCnnModel(classes=["a"])
    model = PixelCnnModel(classes=["a", "b"], size=16, width=2)
    image = photos[0][0]
    with pytest.raises(DataError, match="2 images for 1 boxes"):
        model.predict([image, image], [None])
    with pytest.raises(DataError, match=r"non-finite coordinate"):
        model.predict([image], [(0.0, float("nan"), 10.0, 10.0)])
    with pytest.raises(DataError, match=r"tiles must be \[N, 3, 16, 16\], got \[1, 3, 20, 20\]"):
        model.probabilities(CnnInputs(torch.zeros(1, 3, 20, 20, dtype=torch.uint8), torch.zeros(1, 6)))
    rows = _rows(photos[:6], SMALL)
    with pytest.raises(DataError, match="3 folds need at least as many groups, got 2"):
        fit_cnn_category_model(LabelledRows(rows.inputs, rows.labels, [0, 1] * 3), training=SMALL)
    with pytest.raises(DataError, match=r"tiles are \[3, 20, 20\], CnnTraining.size is 32"):
        fit_cnn_category_model(rows, training=CnnTraining(size=32))
    targets = [CaptionTarget(key=f"k/{i}/1", open_image=lambda: image, bbox=None, annotation={"category_name": "x"})
               for i in range(3)]  # fmt: skip
    with pytest.raises(UnknownNameError, match="pixel-svm"):
        fit_category_model_on_targets(targets, out_dir=tmp_path / "m", kind="pixel-svm")
    model.save(tmp_path / "m")
    sidecar = tmp_path / "m" / "category_model.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "feature_version": "capret-pixcnn-v0"}))
    with pytest.raises(CheckpointError, match="capret-pixcnn-v0"):
        load_category_model(tmp_path / "m")


def test_fit_on_targets_trains_the_cnn_within_its_folds(photos, tmp_path: Path) -> None:
    targets = [
        CaptionTarget(key=f"demo/{i}/1", open_image=lambda image=image: image, bbox=box,
                      annotation={"category_name": category, "identity": [identity, 1]})
        for i, (image, box, category, identity) in enumerate(photos[:12])
    ]  # fmt: skip
    training = CnnTraining(size=16, width=2, folds=3, steps=3)
    model, oof = fit_category_model_on_targets(
        targets, out_dir=tmp_path / "m", kind="pixel-cnn", training=training, folds=2, max_seconds=None
    )
    assert isinstance(model, PixelCnnModel) and len(model.members) == 2  # folds given: 2 members
    assert sorted(oof) == sorted(t.key for t in targets)
    assert model.metrics["cross_fitted_accuracy"] == model.metrics["heldout_accuracy"]
    assert (tmp_path / "m" / "model.safetensors").is_file()
