"""Every registered baseline: shape and no NaN; GeM against a loop reference; PCA whitening whitens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from capret.models.baselines import GeM, RegionalGeM, create_baseline, gem, list_baselines

pytestmark = pytest.mark.usefixtures("one_thread")


def _gem_loop(x: torch.Tensor, p: list[float]) -> torch.Tensor:
    """GeM written out element by element."""
    b, c, h, w = x.shape
    out = torch.empty(b, c, dtype=torch.float64)
    for i in range(b):
        for j in range(c):
            total = 0.0
            for y in range(h):
                for z in range(w):
                    total += max(float(x[i, j, y, z]), 1e-6) ** p[j]
            out[i, j] = (total / (h * w)) ** (1.0 / p[j])
    return out


def test_gem_matches_loop_shared_and_per_channel() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64) - 0.1  # some negatives get clamped
    torch.testing.assert_close(gem(x, 3.0), _gem_loop(x, [3.0] * 3))
    p = torch.tensor([1.0, 2.5, 6.0], dtype=torch.float64)
    torch.testing.assert_close(gem(x, p), _gem_loop(x, p.tolist()))
    torch.testing.assert_close(gem(x.clamp_min(1e-6), 1.0), x.clamp_min(1e-6).mean(dim=(-2, -1)))
    module = GeM(p=2.0, channels=3).double()
    torch.testing.assert_close(module(x), _gem_loop(x, [2.0] * 3))
    module(x).sum().backward()
    assert module.p.grad is not None and module.p.grad.shape == (3,)
    with pytest.raises(ValueError, match="exponents"):
        gem(x, torch.ones(4))


def test_regional_gem_adds_window_lp_pooling() -> None:
    x = torch.rand(1, 2, 5, 5, dtype=torch.float64) + 0.1
    pool = RegionalGeM(p=2.0, kernel=3).double()
    # reference: the Lp mean of every 3 x 3 window (replicate padding), added to the map, then GeM
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    regional = torch.empty_like(x)
    for y in range(5):
        for z in range(5):
            regional[..., y, z] = padded[..., y : y + 3, z : z + 3].pow(2).mean(dim=(-2, -1)).sqrt()
    torch.testing.assert_close(pool(x), gem(x + regional, 2.0))
    with pytest.raises(ValueError, match="odd"):
        RegionalGeM(kernel=2)


@pytest.mark.parametrize("name", ["gem", "gem_plus", "scale_gem", "regional_gem"])
def test_timm_baselines_shape_and_finite(name: str) -> None:
    model = create_baseline(name, source="resnet18", pretrained=False, image_size=64, whiten_dim=16).eval()
    pixels = torch.randn(20, 3, 64, 64)
    with torch.no_grad():
        model.fit_whitening(model.descriptors(pixels))
        out = model.encode(pixels[:3])
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_pca_whitening_decorrelates_train_descriptors() -> None:
    model = create_baseline("gem", source="resnet18", pretrained=False, image_size=64, whiten_dim=8).eval()
    with torch.no_grad():
        desc = model.descriptors(torch.randn(40, 3, 64, 64))
        model.fit_whitening(desc)
        assert model.whiten is not None
        white = model.whiten(torch.nn.functional.normalize(desc, dim=-1)).double()
    cov = (white - white.mean(0)).T @ (white - white.mean(0)) / (len(white) - 1)
    torch.testing.assert_close(cov, torch.eye(8, dtype=torch.float64), atol=1e-3, rtol=1e-3)


def test_clip_baseline_from_random_clip(tmp_path: Path) -> None:
    from capret.testing import save_random_clip

    folder = save_random_clip(tmp_path / "clip", texts=["a red dress", "blue jeans"])
    model = create_baseline("clip", source=str(folder)).eval()
    size = model.data_config.image_size
    with torch.no_grad():
        out = model.encode(torch.randn(2, 3, size, size))
    assert out.shape == (2, model.embed_dim) and torch.isfinite(out).all()


def test_registry_lists_and_rejects() -> None:
    assert {"clip", "gem", "gem_plus", "regional_gem", "scale_gem"} <= set(list_baselines())
    with pytest.raises(KeyError, match="valid names"):
        create_baseline("netvlad")
    with pytest.raises(ValueError, match="timm model"):
        create_baseline("gem", source="no_such_net")


def test_clip_baseline_from_random_open_clip(tmp_path: Path) -> None:
    from tiny_zeroshot import tiny_open_clip

    from capret.models.clip import load_clip

    name = tiny_open_clip(tmp_path / "oc")
    model = create_baseline("clip", source=name, backend="open_clip").eval()
    size = model.data_config.image_size
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model.encode(pixels)
        direct = load_clip(name, backend="open_clip", preprocess="none").model.encode_image(pixels)
    assert out.shape == (2, model.embed_dim)
    torch.testing.assert_close(out, torch.nn.functional.normalize(direct, dim=-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="only for backend open_clip"):
        create_baseline("clip", source="openai/clip-vit-base-patch32", pretrained="openai")
