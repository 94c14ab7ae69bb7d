"""SEARLE's NT-Xent distillation loss against the explicit formula written as a loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from capret.losses.distillation import nt_xent_loss


def _loop(a: torch.Tensor, b: torch.Tensor, t: float) -> float:
    z = F.normalize(torch.cat([a, b]).double(), dim=-1)
    n, total = a.shape[0], 0.0
    for i in range(2 * n):
        partner = i + n if i < n else i - n
        denominator = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(2 * n) if j != i)
        total += -math.log(math.exp(float(z[i] @ z[partner]) / t) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.25, 1.0, 0.05])
def test_matches_loop(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert nt_xent_loss(a, b, temperature=temperature).item() == pytest.approx(
        _loop(a, b, temperature), rel=1e-5
    )


def test_symmetric_and_minimal_for_aligned_pairs() -> None:
    a = torch.randn(6, 4)
    assert nt_xent_loss(a, a * 3).item() < nt_xent_loss(a, torch.randn(6, 4)).item()
    b = torch.randn(6, 4)
    assert nt_xent_loss(a, b).item() == pytest.approx(nt_xent_loss(b, a).item(), rel=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        nt_xent_loss(a, b[:3])
