"""The DeepFashion2 clothing detector: torchvision's Faster / Mask R-CNN with a configurable backbone.

DeepFashion2 (Ge et al., CVPR 2019) scores retrieval on *detected* items, and its baseline (Match R-CNN) is a
Mask R-CNN. :class:`ClothingDetector` builds the same family from torchvision's detection models, with 13
clothing classes plus background, and lets the backbone be chosen by name:

* ``resnet18`` ... ``resnet152``, ``resnext50_32x4d``, ``wide_resnet50_2`` — torchvision ResNets with an FPN
  (``resnet_fpn_backbone``); ``backbone_weights: DEFAULT`` loads torchvision's ImageNet weights;
* ``mobilenet_v3_large`` / ``mobilenet_v3_small`` — torchvision MobileNetV3 with an FPN (the cheap CPU choice);
* ``timm:<name>`` — any timm model with ``features_only`` support (``timm:convnext_tiny``, ``timm:resnet18``),
  wrapped with a torchvision FPN; ``backbone_weights: DEFAULT`` means ``timm.create_model(pretrained=True)``.

``weights: DEFAULT`` instead loads a *whole* COCO-trained torchvision detector (Faster R-CNN ResNet-50 FPN,
Faster R-CNN MobileNetV3-Large FPN, Mask R-CNN ResNet-50 FPN) and replaces its class heads with 14-way ones,
which is how detectors are usually fine-tuned on DeepFashion2.

The model folder (:meth:`ClothingDetector.save_pretrained`) holds ``detector.safetensors`` and
``capret_model.json`` (kind ``detector``, format + config; folders written before ``kind`` hold
``capret_detector.json`` and still load), and loads offline (:meth:`ClothingDetector.from_pretrained`):
every weight is in the safetensors file, so no pretrained source is needed at load time.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from capret.config import cfg, from_dict, to_dict
from capret.errors import CheckpointError, ConfigError
from capret.io import atomic_write, file_sha256
from capret.models.folder import (
    LEGACY_DETECTOR_CONFIG_FILE,
    MODEL_CONFIG_FILE,
    read_model_config,
    read_weights,
    write_model_config,
)

__all__ = [
    "DETECTOR_CONFIG_FILE",
    "DETECTOR_FORMAT",
    "DETECTOR_WEIGHTS_FILE",
    "NUM_CLASSES",
    "ClothingDetector",
    "DetectorModelConfig",
    "list_backbones",
]

#: the config file of detector folders written before every kind shared ``capret_model.json`` (still read)
DETECTOR_CONFIG_FILE = LEGACY_DETECTOR_CONFIG_FILE
DETECTOR_WEIGHTS_FILE = "detector.safetensors"
DETECTOR_FORMAT = "capret.detector/1"
#: 13 DeepFashion2 categories (ids 1..13) + background (0), the label space of torchvision's heads.
NUM_CLASSES = 14

_RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
_MOBILENETS = ("mobilenet_v3_large", "mobilenet_v3_small")
#: (arch, backbone) -> torchvision builder of a COCO-trained detector that ``weights`` may name.
_FULL_DETECTORS = {
    ("faster_rcnn", "resnet50"): "fasterrcnn_resnet50_fpn",
    ("faster_rcnn", "mobilenet_v3_large"): "fasterrcnn_mobilenet_v3_large_fpn",
    ("mask_rcnn", "resnet50"): "maskrcnn_resnet50_fpn",
}


def list_backbones() -> list[str]:
    """Backbone names :class:`DetectorModelConfig` accepts (plus any ``timm:<name>``)."""
    return [*_RESNETS, *_MOBILENETS, "timm:<name>"]


@dataclass
class DetectorModelConfig:
    """Architecture of the clothing detector (a ``model:`` section of the detector task's YAML)."""

    arch: Literal["faster_rcnn", "mask_rcnn", "centernet"] = cfg(
        "faster_rcnn",
        "faster_rcnn (boxes), mask_rcnn (boxes + masks, as Match R-CNN) or centernet (boxes as heatmap peaks, "
        "capret.models.centernet: no anchors or proposals, the CPU choice)",
    )
    backbone: str = cfg(
        "resnet50",
        "resnet18..resnet152, resnext/wide_resnet, mobilenet_v3_large/_small, or timm:<name>; centernet: "
        "tiny_cnn or timm:<name>",
    )
    backbone_width: int = cfg(16, "centernet's tiny_cnn: width of its first stage (then 2x, 4x, 6x, 8x)")
    weights: str | None = cfg(
        None, "whole COCO-trained torchvision detector to start from (DEFAULT or an enum name); null = none"
    )
    backbone_weights: str | None = cfg(
        None, "ImageNet backbone weights: DEFAULT / torchvision enum name (timm: DEFAULT = pretrained=True)"
    )
    trainable_layers: int | None = cfg(
        None, "backbone stages left trainable (0-5; null = 3 with pretrained weights, all without)"
    )
    frozen_bn: bool | None = cfg(
        None, "freeze BatchNorm statistics (null = frozen with pretrained weights, trained from scratch)"
    )
    mobilenet_dilated: bool = cfg(False, "dilate MobileNetV3's last stage (torchvision's COCO detector does)")
    box_head_width: int = cfg(1024, "width of the two-layer box head (torchvision: 1024; smaller is cheaper)")
    fpn_channels: int = cfg(
        256, "FPN width (timm backbones and centernet's heads; torchvision backbones use 256)"
    )
    min_size: int = cfg(800, "shorter image side after the detector's own resize")
    max_size: int = cfg(1333, "longer image side cap after the resize")
    score_threshold: float = cfg(0.05, "detections below this score are dropped at inference")
    nms_threshold: float = cfg(0.5, "per-class NMS IoU threshold at inference")
    detections_per_image: int = cfg(100, "most detections kept per image")
    rpn_proposals_train: int = cfg(2000, "RPN proposals kept per image in training (before and after NMS)")
    rpn_proposals_test: int = cfg(1000, "RPN proposals kept per image at inference (before and after NMS)")
    rpn_batch_size_per_image: int = cfg(256, "anchors sampled per image for the RPN loss")
    box_batch_size_per_image: int = cfg(512, "proposals sampled per image for the box-head loss")


class _TimmFPN(nn.Module):
    """A timm ``features_only`` trunk followed by a torchvision FPN (+ max-pool level), as torchvision's
    ``BackboneWithFPN`` does for its own CNNs, so any timm CNN can feed the R-CNN heads."""

    def __init__(self, name: str, *, pretrained: bool, out_channels: int) -> None:
        super().__init__()
        import timm
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = timm.create_model(name, pretrained=pretrained, features_only=True)
        info: Any = self.body.feature_info
        channels = list(info.channels())[-4:]
        self.levels = len(channels)
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.body(x)[-self.levels :]
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _weights_enum(builder: str, name: str) -> Any:
    """Resolve ``DEFAULT`` or an enum member name for a torchvision builder (``resnet50`` -> ResNet50_Weights)."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(builder)
    try:
        return enum[name]
    except KeyError:
        valid = ", ".join(["DEFAULT", *enum.__members__])
        raise ConfigError(f"unknown weights {name!r} for {builder}; valid: {valid}") from None


def _frozen_bn(config: DetectorModelConfig) -> bool:
    """Frozen BatchNorm keeps pretrained statistics; from scratch the statistics must be learnt."""
    if config.frozen_bn is not None:
        return config.frozen_bn
    return config.backbone_weights is not None or config.weights is not None


def _backbone(config: DetectorModelConfig) -> tuple[nn.Module, int]:
    """``(backbone with out_channels, number of feature maps)`` for the config's backbone name."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import misc

    name, pretrained = config.backbone, config.backbone_weights is not None
    trainable = config.trainable_layers if config.trainable_layers is not None else (3 if pretrained else 5)
    norm = misc.FrozenBatchNorm2d if _frozen_bn(config) else nn.BatchNorm2d
    if name in _RESNETS:
        weights = _weights_enum(name, config.backbone_weights) if config.backbone_weights else None
        body = resnet_fpn_backbone(
            backbone_name=name, weights=weights, norm_layer=norm, trainable_layers=trainable
        )
        return body, 5  # layer1..layer4 + pool
    if name in _MOBILENETS:
        import torchvision.models as tvm
        from torchvision.models.detection.backbone_utils import _mobilenet_extractor

        weights = _weights_enum(name, config.backbone_weights) if config.backbone_weights else None
        trunk = getattr(tvm, name)(weights=weights, dilated=config.mobilenet_dilated, norm_layer=norm)
        return _mobilenet_extractor(trunk, True, min(trainable, 6)), 3  # two stages + pool
    if name.startswith("timm:"):
        if config.backbone_weights not in (None, "DEFAULT"):
            raise ConfigError(
                f"timm backbones take backbone_weights DEFAULT or null, got {config.backbone_weights}"
            )
        timm_body = _TimmFPN(name[len("timm:") :], pretrained=pretrained, out_channels=config.fpn_channels)
        return timm_body, timm_body.levels + 1
    raise ConfigError(f"unknown detector backbone {name!r}; valid: {', '.join(list_backbones())}")


def _anchor_generator(levels: int) -> Any:
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if levels == 5:  # one size per FPN level (torchvision's ResNet-FPN default)
        sizes: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
    else:  # fewer levels: every size on every level (torchvision's MobileNet-FPN choice)
        sizes = ((32, 64, 128, 256, 512),) * levels
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)


def _head_options(config: DetectorModelConfig) -> dict[str, Any]:
    return {
        "min_size": config.min_size,
        "max_size": config.max_size,
        "box_score_thresh": config.score_threshold,
        "box_nms_thresh": config.nms_threshold,
        "box_detections_per_img": config.detections_per_image,
        "rpn_batch_size_per_image": config.rpn_batch_size_per_image,
        "rpn_pre_nms_top_n_train": config.rpn_proposals_train,
        "rpn_post_nms_top_n_train": config.rpn_proposals_train,
        "rpn_pre_nms_top_n_test": config.rpn_proposals_test,
        "rpn_post_nms_top_n_test": config.rpn_proposals_test,
        "box_batch_size_per_image": config.box_batch_size_per_image,
    }


def _build_full(config: DetectorModelConfig) -> nn.Module:
    """A COCO-trained torchvision detector with its class heads replaced by 14-way ones."""
    import torchvision.models.detection as tvd
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    builder = _FULL_DETECTORS.get((config.arch, config.backbone))
    if builder is None:
        combos = ", ".join(f"{a}+{b}" for a, b in _FULL_DETECTORS)
        raise ConfigError(
            f"weights={config.weights!r} needs a torchvision detector for {config.arch}+{config.backbone}; "
            f"available: {combos} (or set backbone_weights for an ImageNet backbone instead)"
        )
    weights = _weights_enum(builder, str(config.weights))
    model = getattr(tvd, builder)(weights=weights, **_head_options(config))
    box = model.roi_heads.box_predictor
    model.roi_heads.box_predictor = FastRCNNPredictor(box.cls_score.in_features, NUM_CLASSES)
    if config.arch == "mask_rcnn":
        conv = model.roi_heads.mask_predictor.conv5_mask
        model.roi_heads.mask_predictor = MaskRCNNPredictor(conv.in_channels, 256, NUM_CLASSES)
    return model


def _build_centernet(config: DetectorModelConfig) -> nn.Module:
    """The anchor-free :class:`~capret.models.centernet.CenterNet` (``rpn_*``, ``box_*`` and ``mobilenet_*``
    options do not apply to it)."""
    from capret.models.centernet import CenterNet

    if config.weights is not None:
        raise ConfigError(f"arch centernet has no whole pretrained detector; got weights={config.weights!r}")
    if config.backbone_weights not in (None, "DEFAULT"):
        raise ConfigError(
            f"centernet backbones take backbone_weights DEFAULT or null, got {config.backbone_weights}"
        )
    return CenterNet(config, num_classes=NUM_CLASSES - 1)


def build_torchvision_detector(config: DetectorModelConfig) -> nn.Module:
    """The torchvision ``FasterRCNN`` / ``MaskRCNN`` of ``config`` (randomly initialised heads)."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    if config.arch == "centernet":
        return _build_centernet(config)
    if config.arch not in ("faster_rcnn", "mask_rcnn"):
        raise ConfigError(f"unknown detector arch {config.arch!r}; valid: faster_rcnn, mask_rcnn, centernet")
    if config.weights is not None:
        return _build_full(config)
    backbone, levels = _backbone(config)
    width = config.box_head_width
    masks: dict[str, Any] = {}
    if config.arch == "mask_rcnn":
        from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

        masks["mask_predictor"] = MaskRCNNPredictor(256, 256, NUM_CLASSES)  # torchvision's mask head width
    cls = MaskRCNN if config.arch == "mask_rcnn" else FasterRCNN
    return cls(
        backbone,
        **masks,
        rpn_anchor_generator=_anchor_generator(levels),
        # the RoI pooler's 7 x 7 output feeds the box head, as in torchvision's own builders
        box_head=TwoMLPHead(int(backbone.out_channels) * 7 * 7, width),  # type: ignore[arg-type]
        box_predictor=FastRCNNPredictor(width, NUM_CLASSES),
        **_head_options(config),
    )


class ClothingDetector(nn.Module):
    """A torchvision R-CNN over the 13 DeepFashion2 classes.

    ``forward(images, targets)`` is torchvision's: in training mode it takes a list of ``[3, H, W]`` float
    images in [0, 1] and their targets (``boxes`` xyxy, ``labels`` 1..13, ``masks`` for Mask R-CNN) and returns
    the named losses; in eval mode it returns one ``{"boxes", "labels", "scores"}`` dict per image.
    """

    def __init__(self, config: DetectorModelConfig) -> None:
        super().__init__()
        self.config = config
        self.net = build_torchvision_detector(config)

    @property
    def has_masks(self) -> bool:
        return self.config.arch == "mask_rcnn"

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        return self.net(images, targets)  # type: ignore[no-any-return]

    # ---------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``detector.safetensors`` + ``capret_model.json`` (kind ``detector``); the folder loads without any
        download."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(
            directory / DETECTOR_WEIGHTS_FILE,
            lambda tmp: save_file(state, str(tmp), metadata={"format": DETECTOR_FORMAT}),
        )
        # Every weight is in the file: the stored config builds the architecture without any pretrained source.
        # A whole torchvision detector was built with frozen BatchNorm (and a dilated MobileNet): say so
        # explicitly, so the same modules are rebuilt from the config alone.
        portable = replace(
            self.config,
            weights=None,
            backbone_weights=None,
            frozen_bn=_frozen_bn(self.config),
            mobilenet_dilated=self.config.mobilenet_dilated or self.config.weights is not None,
        )
        write_model_config(
            directory,
            kind="detector",
            format=DETECTOR_FORMAT,
            config=to_dict(portable),
            trained_from=to_dict(self.config),
            sha256={DETECTOR_WEIGHTS_FILE: file_sha256(directory / DETECTOR_WEIGHTS_FILE)},  # checked on load
        )
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, device: str | torch.device | None = None, verify: bool = True
    ) -> ClothingDetector:
        """Load a folder written by :meth:`save_pretrained` (weights via safetensors only; their SHA-256, when
        recorded, is verified unless ``verify=False``)."""
        directory = Path(directory)
        meta = read_model_config(directory)  # capret_model.json, or a legacy folder's capret_detector.json
        meta_path = directory / (
            MODEL_CONFIG_FILE if (directory / MODEL_CONFIG_FILE).is_file() else DETECTOR_CONFIG_FILE
        )
        if meta.get("format") != DETECTOR_FORMAT:
            raise CheckpointError(f"format {meta.get('format')!r} is not {DETECTOR_FORMAT!r}", path=meta_path)
        model = cls(from_dict(DetectorModelConfig, meta["config"]))
        weights = directory / DETECTOR_WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError("detector weights are missing", path=weights)
        recorded = (meta.get("sha256") or {}).get(DETECTOR_WEIGHTS_FILE) if verify else None
        return read_weights(model, weights, sha256=recorded, device=device, built_from=str(meta_path)).eval()
