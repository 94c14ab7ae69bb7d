"""CLIP preprocessing and CLIP4Cir padding, checked against hand-computed sizes and pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capret.data.transforms import CLIP_MEAN, CLIP_STD, SquarePad, TargetPad, clip_transform, open_image


def _white(w: int, h: int) -> Image.Image:
    return Image.new("RGB", (w, h), (255, 255, 255))


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((100, 300), (240, 300)),  # r=3: s=300/1.25=240, pad (240-100)/2=70 each side horizontally
        ((300, 100), (300, 240)),
        ((200, 100), (200, 160)),  # r=2: s=160, vertical pad 30 each side
        ((101, 300), (239, 300)),  # s=240: int(139/2)=69 each side -> 101+138
        ((100, 124), (100, 124)),  # r=1.24 < 1.25: unchanged
        ((100, 125), (100, 125)),  # r=1.25: s=100, pads int(0)=0 and max(int(-12.5),0)=0
        ((50, 50), (50, 50)),
    ],
)
def test_target_pad_sizes(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert TargetPad(1.25)(_white(*size)).size == expected


def test_target_pad_pixels_are_black_and_symmetric() -> None:
    out = np.asarray(TargetPad(1.25)(_white(100, 300)))
    assert out.shape == (300, 240, 3)
    assert (out[:, :70] == 0).all() and (out[:, -70:] == 0).all()
    assert (out[:, 70:170] == 255).all()


def test_target_pad_other_ratio_and_validation() -> None:
    assert TargetPad(2.0)(_white(100, 300)).size == (150, 300)  # s=150, pad 25 each side
    with pytest.raises(ValueError, match="target_ratio"):
        TargetPad(0.5)


@pytest.mark.parametrize(
    ("size", "expected"), [((100, 300), (300, 300)), ((300, 101), (300, 299)), ((64, 64), (64, 64))]
)
def test_square_pad_sizes(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert SquarePad()(_white(*size)).size == expected


def test_clip_transform_shapes_and_normalisation() -> None:
    tf = clip_transform(32, pad=None)
    x = tf(_white(40, 90))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)


def test_clip_transform_targetpad_keeps_whole_garment() -> None:
    """A tall white image padded to 1.25 then cropped: black columns at the sides, nothing cut at the top."""
    black = ((0.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))[:, None]
    x = clip_transform(40, pad="targetpad")(_white(100, 300))
    # 240x300 -> resize short side to 40 -> 40x50 -> centre crop 40x40: rows cut, the 70/240 pad columns stay.
    torch.testing.assert_close(x[:, :, 0], black.expand(3, 40), atol=1e-4, rtol=0)
    plain = clip_transform(40, pad=None)(_white(100, 300))
    assert torch.all(plain[:, :, 0] > 1.0)  # no padding: the white garment fills the crop
    squared = clip_transform(40, pad="squarepad")(_white(100, 300))
    assert squared.shape == (3, 40, 40)
    assert (squared[0, :, :10] < 0).all()  # square padding leaves wider black bands (100/300 of the width)


def test_clip_transform_converts_modes_and_rejects_bad_pad() -> None:
    assert clip_transform(16)(Image.new("L", (20, 20), 128)).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="targetpad"):
        clip_transform(16, pad="centre")  # type: ignore[arg-type]


def test_open_image_names_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.png"):
        open_image(tmp_path / "missing.png")
    Image.new("L", (3, 4)).save(tmp_path / "grey.png")
    assert open_image(tmp_path / "grey.png").mode == "RGB"
