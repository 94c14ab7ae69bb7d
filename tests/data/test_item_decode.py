"""The training loader's photo decoders against today's path (PIL full decode + crop + resize) as the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capret.data.deepfashion2 import Item
from capret.data.imagefile import decode_image
from capret.data.items import ItemDataset, ItemTransform
from capret.errors import BadImageError, ConfigError, MissingImageError

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _photo(path: Path, *, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    """A smooth colour photo with some texture (JPEG, quality 90): gradients plus low-amplitude noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h) + 64], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, quality=90)
    return path


def _item(image_id: int, bbox: tuple[float, float, float, float]) -> Item:
    return Item(
        image_id=image_id, item_index=1, source="shop", pair_id=image_id, style=1, category_id=1,
        category_name="short sleeve top", bbox=bbox,
    )  # fmt: skip


def _dataset(root: Path, items: list[Item], *, decode: str, image_size: int = 64) -> ItemDataset:
    transform = ItemTransform(image_size=image_size, mean=MEAN, std=STD, augment=True)
    return ItemDataset(
        root=root,
        split="train",
        items=items,
        labels=np.arange(len(items)),
        transform=transform,
        decode=decode,
    )


def _pixel_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Absolute difference in 0-255 pixel units (normalisation undone)."""
    return ((a - b) * torch.tensor(STD).view(3, 1, 1) * 255).abs()


def test_torchvision_decoder_equals_pil(tmp_path: Path) -> None:
    colour = _photo(tmp_path / "c.jpg", size=(160, 120), seed=0)
    grey = _photo(tmp_path / "g.jpg", size=(96, 80), seed=1, mode="L")
    for path in (colour, grey):  # grey JPEGs stay on PIL, colour ones go through decode_jpeg
        a = np.asarray(decode_image(path))
        b = np.asarray(decode_image(path, decoder="torchvision"))
        assert a.shape == b.shape and np.array_equal(a, b)


def test_decoder_errors_name_the_file(tmp_path: Path) -> None:
    good = _photo(tmp_path / "c.jpg", size=(160, 120), seed=0)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for decoder in ("pil", "torchvision"):
        with pytest.raises(BadImageError, match="broken.jpg"):
            decode_image(broken, decoder=decoder)
    with pytest.raises(ConfigError, match="nvjpeg"):
        decode_image(good, decoder="nvjpeg")
    with pytest.raises(ConfigError, match="reduce"):
        decode_image(good, reduce=3)


def test_reduced_decode_sizes(tmp_path: Path) -> None:
    path = _photo(tmp_path / "c.jpg", size=(643, 481), seed=0)
    for factor in (1, 2, 4, 8):
        assert decode_image(path, reduce=factor).size == (-(-643 // factor), -(-481 // factor))
    png = tmp_path / "p.png"
    Image.open(path).save(png)
    assert decode_image(png, reduce=4).size == (643, 481)  # only JPEGs have DCT-domain scaling


def test_reduce_factor_keeps_the_resize_a_downscale() -> None:
    plain = ItemTransform(image_size=100, mean=MEAN, std=STD, crop_margin=0.0)
    assert plain.reduce_factor((1000, 1000), (0, 0, 199, 900)) == 1  # 199 < 2 * 100
    assert plain.reduce_factor((1000, 1000), (0, 0, 200, 900)) == 2
    assert plain.reduce_factor((1000, 1000), (0, 0, 850, 900)) == 8
    assert plain.reduce_factor((1000, 300), (0, 0, 900, 900)) == 2  # box clipped to the photo
    margin = ItemTransform(image_size=100, mean=MEAN, std=STD, crop_margin=0.25)
    assert margin.reduce_factor((1000, 1000), (0, 0, 300, 900)) == 4  # 300 * 1.5 = 450
    augment = ItemTransform(image_size=100, mean=MEAN, std=STD, crop_margin=0.0, augment=True)
    assert augment.reduce_factor((1000, 1000), (0, 0, 400, 900)) == 2  # the window keeps 75%: 300
    full = ItemTransform(image_size=100, mean=MEAN, std=STD, mode="full")
    assert full.reduce_factor((1000, 450), (0, 0, 10, 10)) == 4


def test_dataset_decoders_against_the_pil_reference(tmp_path: Path) -> None:
    for image_id in (1, 2):
        _photo(tmp_path / "train" / "image" / f"{image_id:06d}.jpg", size=(320, 256), seed=image_id)
    # item 1 is small (no reduction at image_size 64); item 2 is large enough for a 1/2 decode
    items = [_item(1, (100.5, 80.2, 190.7, 200.1)), _item(2, (10.0, 12.5, 300.0, 250.0))]
    reference = _dataset(tmp_path, items, decode="pil")
    torchvision = _dataset(tmp_path, items, decode="torchvision")
    reduced = _dataset(tmp_path, items, decode="reduced")
    assert reduced.transform.reduce_factor((320, 256), items[0].bbox) == 1
    assert reduced.transform.reduce_factor((320, 256), items[1].bbox) == 2
    for seed in (3, 4, 5):
        for index in (0, 1):
            ref = reference[(index, seed)]
            assert torch.equal(torchvision[(index, seed)]["pixels"], ref["pixels"])
            other = reduced[(index, seed)]
            diff = _pixel_diff(other["pixels"], ref["pixels"])
            if index == 0:  # no reduction: exactly today's path
                assert torch.equal(other["pixels"], ref["pixels"]) and torch.equal(other["box"], ref["box"])
            else:  # DCT-domain downscale: close, not equal; the box target moves by under one reduced pixel
                assert 0 < float(diff.mean()) < 4.0
                assert float((other["box"] - ref["box"]).abs().max()) < 2 / 128


def test_dataset_decode_option_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="turbo"):
        _dataset(tmp_path, [_item(1, (0, 0, 10, 10))], decode="turbo")
    with pytest.raises(MissingImageError, match="000001.jpg"):
        _dataset(tmp_path, [_item(1, (0, 0, 10, 10))], decode="reduced")[(0, 1)]
