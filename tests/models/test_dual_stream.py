"""Dual-stream model, item preprocessing with box tracking, P x K sampler, caption join."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_text import build_tiny_bert  # noqa: E402

from capret.data.captions import join_captions  # noqa: E402
from capret.data.deepfashion2 import Item  # noqa: E402
from capret.data.items import ItemTransform, PKBatchSampler  # noqa: E402
from capret.models.dual_stream import (  # noqa: E402
    DualStreamModel,
    DualStreamModelConfig,
    TextConfig,
    VisualConfig,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(text_dir: Path, **overrides: object) -> DualStreamModelConfig:
    return DualStreamModelConfig(
        visual=VisualConfig(source="test_resnet", image_size=32),
        text=TextConfig(source=str(text_dir), pretrained=True, max_length=16, freeze=False),
        width=32,
        depth=2,
        heads=2,
        embed_dim=24,
        itc_dim=16,
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> DualStreamModel:
    torch.manual_seed(0)
    return DualStreamModel(tiny_config(build_tiny_bert(tmp_path_factory.mktemp("bert")))).eval()


def test_outputs_are_normalised_and_boxes_in_unit_square(model: DualStreamModel) -> None:
    pixels = torch.randn(3, 3, 32, 32)
    tokens = model.tokenize(["a red top", "blue trousers", "a green skirt with pleats"])
    out = model(pixels, **tokens)
    assert out.embedding.shape == (3, 24) and out.image_embedding.shape == (3, 16)
    assert out.text_embedding is not None and out.text_embedding.shape == (3, 16)
    for emb in (out.embedding, out.image_embedding, out.text_embedding):
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    assert out.box.shape == (3, 4) and bool(((out.box > 0) & (out.box < 1)).all())
    feats = model.forward_features(pixels, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(model.forward_head(feats), out.embedding)
    torch.testing.assert_close(model.encode_query(pixels, tokens), out.embedding)


def test_dropped_caption_equals_image_only_path(model: DualStreamModel) -> None:
    pixels = torch.randn(3, 3, 32, 32)
    tokens = model.tokenize(["a red top with a long caption that has many tokens", "blue", "grey shorts"])
    has = torch.tensor([False, True, False])
    mixed = model(pixels, **tokens, has_caption=has).embedding
    image_only = model.encode_image(pixels)
    with_text = model.encode_query(pixels, tokens)
    torch.testing.assert_close(mixed[~has], image_only[~has], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[has], with_text[has], rtol=1e-5, atol=1e-5)
    assert (image_only[1] - with_text[1]).abs().max() > 1e-4  # the caption changes the embedding


def test_save_and_load_round_trip(model: DualStreamModel, tmp_path: Path) -> None:
    folder = model.save_pretrained(tmp_path / "m")
    names = {p.name for p in folder.rglob("*") if p.is_file()}
    assert "model.safetensors" in names and "capret_model.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    loaded = DualStreamModel.from_pretrained(folder)
    pixels = torch.randn(2, 3, 32, 32)
    tokens = model.tokenize(["a red top", "blue trousers"])
    torch.testing.assert_close(loaded.encode_query(pixels, tokens), model.encode_query(pixels, tokens))
    with pytest.raises(FileNotFoundError, match="not a capret model folder"):
        DualStreamModel.from_pretrained(tmp_path)


def _white_box_image(box: tuple[int, int, int, int], size: tuple[int, int] = (120, 80)) -> Image.Image:
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    array[y1:y2, x1:x2] = 255
    return Image.fromarray(array)


def _box_from_pixels(pixels: torch.Tensor) -> np.ndarray:
    """Reference: the bright rectangle's extent in the transformed image, as normalised cx, cy, w, h."""
    mask = (pixels.mean(0) > 0).numpy()
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return np.array([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h])


@pytest.mark.parametrize("mode", ["crop", "full"])
@pytest.mark.parametrize("pad", ["none", "targetpad", "squarepad"])
def test_item_transform_tracks_the_box(mode: str, pad: str) -> None:
    box = (30, 20, 70, 50)
    image = _white_box_image(box)
    transform = ItemTransform(
        image_size=64,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        mode=mode,
        crop_margin=0.25,
        pad=pad,
        augment=True,
    )
    for seed in range(6):
        pixels, target = transform(image, box, generator=torch.Generator().manual_seed(seed))
        assert pixels.shape == (3, 64, 64)
        np.testing.assert_allclose(target.numpy(), _box_from_pixels(pixels), atol=0.05)
    a = transform(image, box, generator=torch.Generator().manual_seed(3))
    b = transform(image, box, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a[0], b[0])  # a sample's randomness depends only on its seed
    plain = ItemTransform(
        image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, mode=mode, crop_margin=0.25, pad=pad
    )
    _, target = plain(image, box)
    np.testing.assert_allclose(target.numpy(), _box_from_pixels(plain(image, box)[0]), atol=0.03)
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        transform(image, box)


def test_item_transform_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="mode 'zoom'"):
        ItemTransform(image_size=8, mean=(0,) * 3, std=(1,) * 3, mode="zoom")


def _sampler_data() -> tuple[np.ndarray, list[str]]:
    labels, sources = [], []
    for label in range(10):
        for view in range(1 + label % 4):  # identities with 1..4 items; item 0 is the shop view
            labels.append(label)
            sources.append("shop" if view == 0 else "user")
    return np.asarray(labels), sources


def test_pk_sampler_batches_identities_and_domains() -> None:
    labels, sources = _sampler_data()
    sampler = PKBatchSampler(labels, sources, p=3, k=4, seed=5, epoch=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3
    for batch in batches:
        indices = [i for i, _ in batch]
        assert len(indices) == 12
        ids = labels[indices].reshape(3, 4)
        assert (ids == ids[:, :1]).all() and len(set(ids[:, 0])) == 3
        for row in np.asarray(indices).reshape(3, 4):
            kinds = {sources[i] for i in row}
            has_user = any(s == "user" for s, lab in zip(sources, labels) if lab == labels[row[0]])
            assert kinds == ({"shop", "user"} if has_user else {"shop"})
    assert batches == list(PKBatchSampler(labels, sources, p=3, k=4, seed=5, epoch=0))
    assert batches != list(PKBatchSampler(labels, sources, p=3, k=4, seed=5, epoch=1))


def test_pk_sampler_splits_batches_over_ranks() -> None:
    labels, sources = _sampler_data()
    everything = PKBatchSampler(labels, sources, p=2, k=2, seed=1, epoch=2, world_size=2).batches()
    ranks = [
        list(PKBatchSampler(labels, sources, p=2, k=2, seed=1, epoch=2, rank=r, world_size=2)) for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 2
    assert ranks[0] + ranks[1] == everything[0::2] + everything[1::2]
    with pytest.raises(ValueError, match="only 10 identities for p=11"):
        PKBatchSampler(labels, sources, p=11, k=2, seed=0, epoch=0)


def test_join_captions_counts_missing(tmp_path: Path) -> None:
    items = [
        Item(
            image_id=i,
            item_index=1,
            source="user",
            pair_id=1,
            style=1,
            category_id=1,
            category_name="x",
            bbox=(0, 0, 1, 1),
        )
        for i in (1, 2, 3)
    ]
    table = {"deepfashion2/000001/1": "a red top", "deepfashion2/000003/1": "  "}
    with pytest.warns(UserWarning, match="2 of 3 items have no caption"):
        joined = join_captions(items, table)
    assert joined.captions == ["a red top", None, None]
    assert (joined.found, joined.missing) == (1, 2)
    assert join_captions(items, None).captions == [None] * 3
    with pytest.raises(FileNotFoundError, match="caption store"):
        join_captions(items, tmp_path / "missing.jsonl")
