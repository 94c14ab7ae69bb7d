"""X-VLM / BEiT relative-position-table resampling (bicubic spline on a geometric-progression grid).

The vectorised :func:`resize_relative_table` (all heads at once, separable ``make_interp_spline``) is checked
against a slow reference written the way BEiT's ``run_class_finetuning.py`` and X-VLM's Swin loader are: the
bisection and the offsets in plain Python loops, then one 2-D interpolating spline per head
(``RectBivariateSpline`` with ``s=0``, the fit scipy's removed ``interp2d(kind="cubic")`` made on a grid).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.interpolate import RectBivariateSpline

from capret.errors import CheckpointError
from capret.models.xvlm_convert import resize_relative_table


def _reference(table: torch.Tensor, dst_size: int, extra: int) -> torch.Tensor:
    rows, heads = table.shape
    src_size = int((rows - extra) ** 0.5)
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        total = 0.0
        for i in range(src_size // 2):
            total += q**i
        if total > dst_size // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    coords = [-d for d in reversed(dis)] + [0.0] + dis
    t = dst_size // 2.0
    new = np.arange(-t, t + 0.1, 1.0)
    columns = []
    for h in range(heads):
        z = table[: src_size * src_size, h].double().numpy().reshape(src_size, src_size)
        spline = RectBivariateSpline(coords, coords, z, kx=3, ky=3, s=0)
        columns.append(torch.from_numpy(spline(new, new)).reshape(-1, 1))
    out = torch.cat(columns, dim=1).to(table.dtype)
    return torch.cat([out, table[rows - extra :]], dim=0) if extra else out


@pytest.mark.parametrize(
    "src_window, dst_window, extra",
    [(7, 12, 0), (4, 8, 0), (7, 12, 3), (14, 24, 3), (8, 5, 0)],
    ids=["swin_224_to_384", "tiny_swin", "beit_window", "beit_224_to_384", "shrink"],
)
def test_matches_the_per_head_reference(src_window: int, dst_window: int, extra: int) -> None:
    g = torch.Generator().manual_seed(src_window * 100 + dst_window)
    heads = 3
    table = torch.randn((2 * src_window - 1) ** 2 + extra, heads, generator=g, dtype=torch.float64)
    out = resize_relative_table(table, (dst_window, dst_window))
    assert out.shape == ((2 * dst_window - 1) ** 2 + extra, heads)
    torch.testing.assert_close(out, _reference(table, 2 * dst_window - 1, extra), rtol=1e-9, atol=1e-9)
    if extra:
        torch.testing.assert_close(out[-extra:], table[-extra:])


def test_a_cubic_surface_on_the_grid_is_reproduced_exactly() -> None:
    """A bicubic spline reproduces a cubic polynomial: the resampled table is the polynomial at the new offsets,
    which pins the grid (geometric source coordinates, integer target offsets) independently of the reference."""
    from capret.models.xvlm_convert import relative_table_grid

    source, target = relative_table_grid(13, 23)
    assert source[6] == 0 and source[7] == 1.0 and abs(source[-1] - 11) < 0.05  # spans the new half-width
    poly = lambda x, y: 0.3 * x**3 - x * y + 2 * y**2 - 0.1 * y**3 + 1  # noqa: E731
    grid = torch.tensor([[poly(x, y) for y in source] for x in source]).reshape(-1, 1)
    out = resize_relative_table(grid, 12).reshape(23, 23)
    expected = torch.tensor([[poly(x, y) for y in target] for x in target])
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-8)


def test_same_window_is_a_copy_and_bad_shapes_are_refused() -> None:
    table = torch.randn(49, 2)
    assert torch.equal(resize_relative_table(table, 4), table)
    with pytest.raises(CheckpointError, match="square window"):
        resize_relative_table(table, (4, 6))
    with pytest.raises(CheckpointError, match="not \\(2W-1\\)"):
        resize_relative_table(torch.randn(64, 2), 6)


def test_dtype_is_kept() -> None:
    out = resize_relative_table(torch.randn(169, 4, dtype=torch.float16), 12)
    assert out.dtype == torch.float16 and out.shape == (529, 4)
