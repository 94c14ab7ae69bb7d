"""Image-retrieval baselines the study compares against, behind one registry (``create_baseline(name, ...)``).

Every baseline maps preprocessed item crops to L2-normalised global descriptors (``encode(pixels)``) and says
how to preprocess (``data_config``), so the same ground-truth-box protocol scores all of them
(:mod:`capret.inference.dualstream.baselines`). All load real pretrained weights with the ecosystem's own calls
(``timm.create_model(name, pretrained=True)``, ``CLIPModel.from_pretrained``); tests build them randomly
initialised.

* ``gem`` — DELG's global branch (Cao et al., ECCV 2020, Sec. 3.1): a CNN backbone, GeM pooling
  (``p = 3``), then a whitening FC layer. Here the whitening is fitted, not trained: PCA whitening on
  descriptors of the train split (:meth:`GlobalDescriptor.fit_whitening`, the learned-whitening practice of
  Radenović et al.), so the baseline needs no gradient training.
* ``gem_plus`` — SuperGlobal's GeM+ (Shao et al., ICCV 2023, Sec. 3.1): GeM with a learnable ``p`` per channel.
* ``scale_gem`` — SuperGlobal's Scale-GeM (Sec. 3.2): GeM descriptors of the image at several scales,
  aggregated over scales with a GeM of their own (``p`` across scales), instead of a plain average.
* ``regional_gem`` — SuperGlobal's Regional-GeM (Sec. 3.1): an Lp pooling over local ``k x k`` windows of the
  feature map (stride 1, so the map keeps its size) added to the map before the global GeM, which brings
  regional context into every location.
* ``clip`` — zero-shot CLIP image embeddings (Radford et al., 2021), through :func:`capret.models.clip.load_clip`.

Late fusion of image and caption similarities is a scoring rule over a baseline and a text encoder, not a
descriptor, and lives in :mod:`capret.inference.dualstream.baselines`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capret.errors import ConfigError
from capret.models.encoders import ImageDataConfig
from capret.registry import Registry

__all__ = [
    "Baseline",
    "ClipBaseline",
    "GeM",
    "GlobalDescriptor",
    "RegionalGeM",
    "create_baseline",
    "gem",
    "list_baselines",
    "register_baseline",
]

_BASELINES: Registry[Baseline] = Registry("baseline")
register_baseline, create_baseline, list_baselines = _BASELINES.functions()


def gem(x: Tensor, p: Tensor | float, *, eps: float = 1e-6) -> Tensor:
    """Generalised-mean pooling of ``[B, C, H, W]`` over H, W: ``(mean x^p)^(1/p)`` (Radenović et al., 2018).

    ``p`` is a scalar or one value per channel (``[C]``): p = 1 is average pooling, p -> inf max pooling.
    """
    p_t = torch.as_tensor(p, dtype=x.dtype, device=x.device)
    if p_t.dim() == 0:
        return x.clamp_min(eps).pow(p_t).mean(dim=(-2, -1)).pow(1.0 / p_t)
    if p_t.shape != (x.shape[1],):
        raise ValueError(f"per-channel GeM needs {x.shape[1]} exponents, got shape {tuple(p_t.shape)}")
    pooled = x.clamp_min(eps).pow(p_t.view(1, -1, 1, 1)).mean(dim=(-2, -1))
    return pooled.pow(1.0 / p_t.view(1, -1))


class GeM(nn.Module):
    """GeM pooling with a learnable exponent: one shared ``p`` (DELG) or one per channel (GeM+).

    Args:
        p: initial exponent (3 in DELG and SuperGlobal).
        channels: ``None`` = one shared ``p``; an int = one ``p`` per channel (SuperGlobal's GeM+).
        learnable: train ``p`` with the rest of the model.
    """

    def __init__(self, *, p: float = 3.0, channels: int | None = None, learnable: bool = True) -> None:
        super().__init__()
        value = torch.full((channels,), float(p)) if channels else torch.tensor(float(p))
        self.p = nn.Parameter(value, requires_grad=learnable)

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, self.p.clamp_min(1.0))


class RegionalGeM(nn.Module):
    """SuperGlobal's Regional-GeM: ``x + LpPool_k(x)`` (stride 1, same size), then a global GeM."""

    def __init__(self, *, p: float = 3.0, kernel: int = 3) -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"regional GeM needs an odd kernel >= 1, got {kernel}")
        self.kernel, self.region_p = kernel, float(p)
        self.pool = GeM(p=p)

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel
        # Lp pooling of each k x k window (its mean of x^p, then the p-th root), padded so the map keeps its size
        powered = F.pad(x.clamp_min(1e-6).pow(self.region_p), (k // 2,) * 4, mode="replicate")
        regional = F.avg_pool2d(powered, k, stride=1).pow(1.0 / self.region_p)
        return self.pool(x + regional)


class Baseline(nn.Module):
    """A global image descriptor: ``encode(pixels) -> [B, D]`` L2-normalised rows; ``data_config`` says how to
    preprocess; ``fit_whitening(features)`` (a no-op unless the baseline has a whitening layer)."""

    data_config: ImageDataConfig
    embed_dim: int
    needs_fit: bool = False

    def encode(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def descriptors(self, pixels: Tensor) -> Tensor:
        """The descriptor before whitening (what :meth:`fit_whitening` is fitted on)."""
        return self.encode(pixels)

    def fit_whitening(self, features: Tensor) -> None:
        return None


class GlobalDescriptor(Baseline):
    """A timm CNN, a pooling module, an optional (PCA-)whitening FC layer, L2 normalisation.

    Args:
        source: timm model name (``resnet50``, ``tf_efficientnet_b0``, ...).
        pretrained: load timm's pretrained weights.
        pooling: ``gem`` (shared p), ``gem_plus`` (per-channel p), ``scale_gem`` or ``regional_gem``.
        p: initial GeM exponent.
        whiten_dim: output size of the whitening layer (DELG's FC); ``None`` = no whitening.
        scales: image scales of ``scale_gem``.
        image_size: input resolution; ``None`` = the backbone's default.
    """

    def __init__(
        self,
        *,
        source: str = "resnet50",
        pretrained: bool = False,
        pooling: str = "gem",
        p: float = 3.0,
        whiten_dim: int | None = None,
        scales: Sequence[float] = (0.7071, 1.0, 1.4142),
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        import timm
        from timm.data import resolve_data_config

        if not timm.is_model(source):
            raise ConfigError(f"unknown timm model {source!r}; see timm.list_models() for valid names")
        if pooling not in ("gem", "gem_plus", "scale_gem", "regional_gem"):
            raise ConfigError(
                f"pooling {pooling!r} is not one of ['gem', 'gem_plus', 'regional_gem', 'scale_gem']"
            )
        backbone: Any = timm.create_model(source, pretrained=pretrained, num_classes=0, global_pool="")
        self.backbone = backbone
        data = resolve_data_config({}, model=backbone)
        size = int(image_size or data["input_size"][-1])
        self.data_config = ImageDataConfig(
            image_size=size,
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
        )
        channels = int(backbone.num_features)
        self.pooling, self.scales = pooling, tuple(float(s) for s in scales)
        if pooling == "regional_gem":
            self.pool: nn.Module = RegionalGeM(p=p)
        else:
            self.pool = GeM(p=p, channels=channels if pooling == "gem_plus" else None)
        self.scale_p = nn.Parameter(torch.tensor(float(p))) if pooling == "scale_gem" else None
        self.whiten = nn.Linear(channels, whiten_dim) if whiten_dim else None
        self.needs_fit = whiten_dim is not None
        self.embed_dim = int(whiten_dim or channels)

    def _pooled(self, pixels: Tensor) -> Tensor:
        feats = self.backbone.forward_features(pixels)
        if feats.ndim != 4:
            raise ValueError(f"GeM baselines need a CNN feature map [B, C, H, W], got {tuple(feats.shape)}")
        return self.pool(feats)

    def descriptors(self, pixels: Tensor) -> Tensor:
        if self.scale_p is None:
            return self._pooled(pixels)
        size = pixels.shape[-1]
        per_scale = []
        for scale in self.scales:
            side = max(32, round(size * scale))
            scaled = pixels if side == size else F.interpolate(pixels, size=(side, side), mode="bilinear")
            per_scale.append(F.normalize(self._pooled(scaled), dim=-1))
        stacked = torch.stack(per_scale, dim=-1).unsqueeze(-1)  # [B, C, S, 1]: GeM across the scales
        return gem(stacked.clamp_min(0.0), self.scale_p.clamp_min(1.0))

    def encode(self, pixels: Tensor) -> Tensor:
        desc = F.normalize(self.descriptors(pixels), dim=-1)
        if self.whiten is not None:
            desc = self.whiten(desc)
        return F.normalize(desc, dim=-1)

    @torch.no_grad()
    def fit_whitening(self, features: Tensor) -> None:
        """PCA whitening from (normalised) train descriptors: ``W = diag(1/sqrt(lambda)) U^T``, ``b = -W mu``."""
        if self.whiten is None:
            return
        x = F.normalize(features.double(), dim=-1)
        mean = x.mean(0)
        centred = x - mean
        cov = centred.T @ centred / max(1, x.shape[0] - 1)
        eigval, eigvec = torch.linalg.eigh(cov)
        order = eigval.argsort(descending=True)[: self.whiten.out_features]
        if order.numel() < self.whiten.out_features:
            raise ConfigError(
                f"whitening to {self.whiten.out_features} dims needs more descriptor dimensions"
            )
        weight = eigvec[:, order].T / eigval[order].clamp_min(1e-6).sqrt()[:, None]
        self.whiten.weight.copy_(weight.float())
        self.whiten.bias.copy_((-weight @ mean).float())


#: the pooled global descriptors, one registered name per pooling (``create_baseline("gem", ...)`` etc.)
for _pooling in ("gem", "gem_plus", "scale_gem", "regional_gem"):
    register_baseline(_pooling)(functools.partial(GlobalDescriptor, pooling=_pooling))


@register_baseline("clip")
class ClipBaseline(Baseline):
    """Zero-shot CLIP image embeddings, from a Hugging Face CLIP or an open_clip model.

    Args:
        source: hf: e.g. ``openai/clip-vit-base-patch32`` or a ``save_pretrained`` folder; open_clip: an
            architecture such as ``ViT-B-32`` (or ``local-dir:DIR`` / ``hf-hub:org/repo``).
        backend: ``hf`` or ``open_clip``.
        pretrained: open_clip only: a pretrained tag (``openai``, ``laion2b_s34b_b79k``) or a weights file;
            ``None`` builds random weights (a control, or where no weights are reachable).
    """

    def __init__(self, *, source: str, backend: str = "hf", pretrained: str | None = None) -> None:
        super().__init__()
        from capret.models.clip import CLIP_MEAN, CLIP_STD, load_clip

        self.bundle = load_clip(source, backend=backend, pretrained=pretrained, preprocess="none")  # type: ignore[arg-type]
        model: Any = self.bundle.model
        if backend == "open_clip":
            size = model.visual.image_size
            size = int(size[0] if isinstance(size, tuple | list) else size)
            stats = getattr(model.visual, "preprocess_cfg", None) or {}
            mean = tuple(stats.get("mean", CLIP_MEAN))
            std = tuple(stats.get("std", CLIP_STD))
        else:
            size, mean, std = int(model.config.vision_config.image_size), CLIP_MEAN, CLIP_STD
        self.data_config = ImageDataConfig(image_size=size, mean=mean, std=std)
        self.embed_dim = int(self.bundle.feature_dim)

    def encode(self, pixels: Tensor) -> Tensor:
        return self.bundle.encode_image(pixels)
