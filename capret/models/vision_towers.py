"""The vision streams of X-VLM (Swin) and X²-VLM (BEiT-v2) as timm backbones, with their token layout.

X-VLM and X²-VLM hand their cross-attention the sequence ``[pooled, token_1 .. token_N]`` where ``pooled`` (the
"CLS" that ``vision_proj`` and the box head read) is the mean of the final tokens:

* **Swin** (X-VLM base, ``swin_base_patch4_window7_224``): tokens are the last stage's features after the final
  LayerNorm, in row-major order; there is no CLS token in the network.
* **BEiT** (X²-VLM, ``beit_base_patch16_224`` / ``beit_large_patch16_224``; BEiT-v2 weights share the BEiT
  architecture): relative position bias in every block, layer scale, no absolute position embedding, the
  mean-pooling variant. The network's own CLS output is dropped; each patch output goes through ``fc_norm``
  (per token, *before* pooling — unlike an image classifier, which pools first) and ``pooled`` is their mean.

Both are built with ``timm.create_model`` (``pretrained=True`` fetches timm's ImageNet weights; X-VLM checkpoints
bring their own through :mod:`capret.models.xvlm_convert`). Module names stay timm's, which are the original
repositories' names, so converted checkpoints need almost no renaming.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from capret.errors import ConfigError

__all__ = ["TimmVisionTower", "VisionTokens"]


class VisionTokens:
    """What the BLIP family reads from a vision stream: ``last_hidden_state`` ``[B, 1 + N, width]``."""

    def __init__(self, last_hidden_state: Tensor) -> None:
        self.last_hidden_state = last_hidden_state


_SUPPORTED = "use a timm Swin (X-VLM, e.g. swin_base_patch4_window7_224) or BEiT model (X²-VLM, e.g. beit_base_patch16_224)"


def _kind(body: nn.Module) -> str:
    from timm.models.beit import Beit
    from timm.models.swin_transformer import SwinTransformer

    if isinstance(body, SwinTransformer):
        return "swin"
    if isinstance(body, Beit):
        return "beit"
    raise ConfigError(f"model.vision_tower: {type(body).__name__} is not supported; {_SUPPORTED}")


class TimmVisionTower(nn.Module):
    """A timm Swin or BEiT backbone returning X-VLM's ``[mean token, tokens]`` sequence.

    Args:
        name: timm model name.
        image_size: input resolution (square).
        pretrained: load timm's weights (``timm.create_model(pretrained=True)``).
        **kwargs: more ``timm.create_model`` arguments (sizes of a custom or tiny model).
    """

    def __init__(self, name: str, *, image_size: int, pretrained: bool = False, **kwargs: Any) -> None:
        super().__init__()
        import timm

        if not name.startswith(("swin", "beit")):
            raise ConfigError(f"model.vision_tower {name!r} is not supported; {_SUPPORTED}")
        try:
            body: Any = timm.create_model(
                name, pretrained=pretrained, num_classes=0, img_size=image_size, **kwargs
            )
        except RuntimeError as exc:  # timm raises RuntimeError for an unknown name
            raise ConfigError(f"model.vision_tower {name!r}: {exc}") from exc
        self.body = body
        self.kind = _kind(body)
        if self.kind == "beit" and not isinstance(body.norm, nn.Identity):
            raise ConfigError(
                f"model.vision_tower {name!r}: X²-VLM's BEiT is the mean-pooling variant "
                "(global_pool='avg', fc_norm per token); this one has a final norm instead"
            )
        self.width = int(body.num_features)
        self.name = name

    def forward(self, pixel_values: Tensor) -> VisionTokens:
        features = self.body.forward_features(pixel_values)
        if self.kind == "swin":  # [B, H, W, C], already through the final norm
            tokens = features.flatten(1, 2)
        else:  # [B, prefix + N, C] before any norm (norm is Identity in the mean-pooling variant)
            tokens = self.body.fc_norm(features[:, self.body.num_prefix_tokens :])
        return VisionTokens(torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1))
