"""Contrastive distillation of pseudo-word tokens (SEARLE phi, Baldrati et al., ICCV 2023, Sec. 4.2).

phi is trained to predict, from an image feature, the token OTI found for that image. Rather than regress the
token, SEARLE uses a symmetric NT-Xent loss (after PALAVRA, Cohen et al. 2022) over the ``2B`` vectors of the
batch: each predicted token must be closer (cosine / temperature) to its own OTI token than to every other
vector of the batch, predicted or OTI, and vice versa. Temperature 0.25 in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from capret.errors import ConfigError

__all__ = ["nt_xent_loss"]


def nt_xent_loss(a: torch.Tensor, b: torch.Tensor, *, temperature: float = 0.25) -> torch.Tensor:
    """Symmetric NT-Xent between paired rows of ``a`` and ``b`` (``[B, D]`` each).

    For each of the ``2B`` vectors ``z_i`` with partner ``z_p``: ``-log(exp(s_ip) / sum_{j != i} exp(s_ij))``,
    ``s = cos / temperature``; the mean over all ``2B`` terms. Computed with ``logsumexp`` (no overflow at low
    temperature), equal to the explicit formula (tests compare it with a loop).
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(
            f"nt_xent_loss needs two [B, D] tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]).float(), dim=-1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, partner)
