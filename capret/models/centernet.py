"""A two-stage CenterNet-style clothing detector small enough to learn from scratch on a CPU in a minute.

Objects as points (Zhou et al., 2019): every garment is the peak of a heatmap at its box centre, and its box is
read from the same cell. There are no anchors, no proposals and no RoI heads, so a training step is one
convolutional pass plus a few dense losses; that is what lets the quickstart fit several times more images into
its CPU budget than a Faster R-CNN of the same backbone (which learnt next to nothing from random initialisation
in it). Two stages, as fashion systems often pair a garment detector with a category model:

1. *Where*: a class-agnostic heatmap. Targets follow TTFNet (Liu et al., 2020): an elliptical Gaussian per box
   whose spread follows the box (``sigma = alpha * size / 6``), scored with CenterNet's penalty-reduced focal
   loss; every cell whose Gaussian is at least :data:`REGION_THRESHOLD` regresses its distances to the box's
   four sides with a GIoU loss, weighted by the Gaussian (many samples per box, which trains faster than one).
   Decoding keeps the 3 x 3 peaks, the best ``detections_per_image``, then NMS at ``nms_threshold``.
2. *What*: :class:`CropClassifier` names each box's category from a square crop of the photo itself (not the
   detector's small input), trained on jittered crops of the annotated boxes and read at inference as the mean
   of the crop's and its mirror image's class probabilities. Each box is reported under every
   class, scored objectness x class probability, as torchvision's R-CNNs report a box per class above their
   score threshold (COCO's class-aware AP then counts a garment whose second guess is right, at that guess's
   lower score); :class:`~capret.inference.detectors.TrainedDetector` keeps each box's best class only.
   Reading the category off the scene-level feature map instead (per-class heatmaps, or a class map beside the
   objectness) was tried on the garment world: within the quickstart's budget its loss stayed near chance.

Backbones: ``tiny_cnn`` (a plain five-stage CNN of width ``backbone_width``, strides 2 to 32) or any
``timm:<name>`` with ``features_only``; the last three feature maps (strides 8, 16, 32) are merged top-down (an
FPN without extra levels, ``fpn_channels`` wide) into the stride-8 map the heads read.

The module keeps torchvision's detector contract, so the ``detector`` task, :func:`~capret.inference.detectors.
predict_coco` and :class:`~capret.inference.detectors.TrainedDetector` use it unchanged: ``forward(images,
targets)`` takes ``[3, H, W]`` images in [0, 1] and returns the named losses (``loss_heatmap``, ``loss_box``,
``loss_classifier``) in training mode and one ``{"boxes", "labels", "scores"}`` dict per image (boxes xyxy in
the input image's pixels, best first) in eval mode.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capret.errors import ConfigError


class CenterNetSettings(Protocol):
    """What :class:`CenterNet` reads of a detector config (``capret.models.detector.DetectorModelConfig``, which
    builds this model and so is not imported here: the layers stay acyclic)."""

    min_size: int
    max_size: int
    score_threshold: float
    nms_threshold: float
    detections_per_image: int
    backbone: str
    backbone_width: int
    backbone_weights: str | None
    fpn_channels: int


__all__ = ["CenterNet", "TinyBackbone", "centernet_targets", "decode_heatmaps"]

#: ImageNet statistics: the tiny CNN is trained from scratch, but timm backbones expect them
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
#: TTFNet's Gaussian spread as a fraction of the box (sigma = alpha * size / 6)
GAUSSIAN_ALPHA = 0.54
#: cells whose Gaussian is at least this regress their box (TTFNet's many-sample regression trains faster
#: than CenterNet's single centre cell)
REGION_THRESHOLD = 0.3
#: weight of the GIoU box loss against the heatmap loss (TTFNet: 5)
BOX_LOSS_WEIGHT = 5.0
#: side of the square crop the category classifier reads, and the crop's margin around the box
CROP_SIZE = 32
CROP_MARGIN = 1.1
#: jittered crops per annotated box in a training step (cheap next to the detector's own pass)
CROP_COPIES = 4
#: the output stride of the heads (the finest merged feature map)
STRIDE = 8
#: padded inputs are multiples of the coarsest stride
_PAD = 32


def _conv(cin: int, cout: int, *, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(nn.Module):
    """Five stages of two 3 x 3 convolutions (the first of each with stride 2), widths ``w, 2w, 4w, 6w, 8w``.

    Plain convolutions rather than depthwise ones: at these sizes a CPU runs dense 3 x 3 kernels several times
    faster per useful FLOP, and the garment world needs shape, not ImageNet-scale capacity.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        if width < 4:
            raise ConfigError(f"backbone_width must be >= 4, got {width}")
        widths = (width, 2 * width, 4 * width, 6 * width, 8 * width)
        stages, cin = [], 3
        for cout in widths:
            stages.append(nn.Sequential(_conv(cin, cout, stride=2), _conv(cout, cout)))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.channels = list(widths[-3:])

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats[-3:]  # strides 8, 16, 32


class _TimmTrunk(nn.Module):
    """A timm ``features_only`` model cut to its stride-8, -16 and -32 maps."""

    def __init__(self, name: str, *, pretrained: bool) -> None:
        super().__init__()
        import timm

        self.body = timm.create_model(name, pretrained=pretrained, features_only=True)
        info: Any = self.body.feature_info
        reductions = list(info.reduction())
        if reductions[-3:] != [8, 16, 32]:
            raise ConfigError(
                f"timm backbone {name!r} has strides {reductions}; centernet needs 8, 16, 32 last"
            )
        self.channels = list(info.channels())[-3:]

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.body(x)[-3:])


def _trunk(backbone: str, *, width: int, pretrained: bool) -> TinyBackbone | _TimmTrunk:
    if backbone == "tiny_cnn":
        if pretrained:
            raise ConfigError("backbone tiny_cnn has no pretrained weights; set backbone_weights: null")
        return TinyBackbone(width)
    if backbone.startswith("timm:"):
        return _TimmTrunk(backbone[len("timm:") :], pretrained=pretrained)
    raise ConfigError(f"unknown centernet backbone {backbone!r}; valid: tiny_cnn, timm:<name>")


def _branch(channels: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(channels, outputs, 1)
    )


def centernet_targets(
    boxes: list[Tensor], *, height: int, width: int, stride: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Training targets on the ``height x width`` output grid for boxes already in network-input pixels.

    Returns ``(heat [B, 1, H, W], box [B, 4, H, W], weight [B, H, W])``: the class-agnostic Gaussian heatmap (1
    exactly at each box's centre cell, the maximum where boxes overlap), and for every cell near a box centre the
    box it regresses (xyxy, input pixels) with its weight: the Gaussian, summing to 1 over each box, so that
    every garment counts once whatever its size. Where two boxes' regions overlap, the smaller box keeps the
    cell (as TTFNet).
    """
    device = boxes[0].device if boxes else torch.device("cpu")
    heat = torch.zeros(len(boxes), 1, height, width, device=device)
    box_target = torch.zeros(len(boxes), 4, height, width, device=device)
    weight = torch.zeros(len(boxes), height, width, device=device)
    ys = torch.arange(height, device=device, dtype=torch.float32).view(-1, 1)
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, -1)
    for b, image_boxes in enumerate(boxes):
        items = sorted(
            image_boxes.tolist(), key=lambda box: -(box[2] - box[0]) * (box[3] - box[1])
        )  # largest first
        for box in items:
            x1, y1, x2, y2 = (v / stride for v in box)
            w, h = x2 - x1, y2 - y1
            if w <= 0 or h <= 0:
                continue
            ix = min(max(int((x1 + x2) / 2), 0), width - 1)
            iy = min(max(int((y1 + y2) / 2), 0), height - 1)
            sx, sy = max(GAUSSIAN_ALPHA * w / 6, 0.5), max(GAUSSIAN_ALPHA * h / 6, 0.5)
            blob = torch.exp(-((xs - ix) ** 2) / (2 * sx * sx) - ((ys - iy) ** 2) / (2 * sy * sy))
            heat[b, 0] = torch.maximum(heat[b, 0], blob)
            region = blob >= REGION_THRESHOLD
            box_target[b, :, region] = torch.tensor(box, dtype=torch.float32, device=device).view(4, 1)
            weight[b, region] = blob[region] / blob[region].sum()
    return heat, box_target, weight


def focal_heatmap_loss(logits: Tensor, heat: Tensor) -> Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), summed and divided by the number of peaks."""
    prob = logits.sigmoid()
    positive = heat >= 1.0
    pos = F.logsigmoid(logits) * (1 - prob) ** 2
    neg = F.logsigmoid(-logits) * prob**2 * (1 - heat) ** 4
    total = torch.where(positive, pos, neg).sum()
    return -total / positive.sum().clamp(min=1)


def regressed_boxes(regression: Tensor, *, stride: int) -> Tensor:
    """``[B, 4, H, W]`` boxes (xyxy, input pixels) of every cell: its centre minus / plus the predicted
    left, top, right and bottom distances (``exp`` of the outputs, in units of the stride)."""
    height, width = regression.shape[-2:]
    ys = (torch.arange(height, device=regression.device, dtype=regression.dtype) + 0.5) * stride
    xs = (torch.arange(width, device=regression.device, dtype=regression.dtype) + 0.5) * stride
    dist = regression.clamp(max=8).exp() * stride
    return torch.stack(
        [
            xs.view(1, 1, -1) - dist[:, 0],
            ys.view(1, -1, 1) - dist[:, 1],
            xs + dist[:, 2],
            ys.view(-1, 1) + dist[:, 3],
        ],
        dim=1,
    )


def square_boxes(boxes: Tensor, *, margin: float = CROP_MARGIN) -> Tensor:
    """The square (side ``margin`` x the longer side) around each ``[N, 4]`` xyxy box, so that a crop resized to
    a fixed square keeps the garment's aspect ratio (a dress is taller than a top)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1, keepdim=True) * margin / 2
    return torch.cat([centre - half, centre + half], dim=1)


def jittered_boxes(boxes: Tensor, *, copies: int, generator: torch.Generator | None = None) -> Tensor:
    """``copies`` versions of each ``[N, 4]`` box, centre moved by up to 10 % of its size and its size scaled by
    0.9-1.2, as a detected box differs from the annotated one; returns ``[N * copies, 4]`` (box-major)."""
    boxes = boxes.repeat_interleave(copies, dim=0)
    size = boxes[:, 2:] - boxes[:, :2]
    rand = torch.rand(len(boxes), 3, generator=generator, device=boxes.device)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + (rand[:, :2] - 0.5) * 0.2 * size
    half = size * (0.9 + 0.3 * rand[:, 2:]) / 2
    return torch.cat([centre - half, centre + half], dim=1)


class CropClassifier(nn.Module):
    """The second stage: the category of a garment from its square crop of the photo, resized to
    :data:`CROP_SIZE` pixels (four stride-2 stages of width ``w, 2w, 4w, 8w``, average pool, linear).

    Classifying an aligned crop is far easier to learn from a few hundred photos than a category read off the
    scene-level feature map (tried: its loss stays near chance within the quickstart's budget), and is how many
    fashion systems pair a class-agnostic garment detector with a category model.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, *, num_classes: int, width: int) -> None:
        super().__init__()
        widths, layers, cin = (width, 2 * width, 4 * width, 8 * width), [], 3
        for cout in widths:
            layers += [_conv(cin, cout, stride=2), _conv(cout, cout)]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.logits = nn.Linear(cin, num_classes)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def crops(batch: Tensor, boxes: list[Tensor]) -> Tensor:
        """``[sum N_i, 3, CROP_SIZE, CROP_SIZE]`` square crops of ``boxes[i]`` (xyxy, pixels of image ``i`` of the
        ``[B, 3, H, W]`` batch in [0, 1])."""
        from torchvision.ops import roi_align

        return roi_align(
            batch,
            [square_boxes(b) for b in boxes],
            output_size=CROP_SIZE,
            spatial_scale=1.0,
            sampling_ratio=2,
            aligned=True,
        )

    def forward(self, crops: Tensor) -> Tensor:
        """Class logits ``[N, C]`` of crops in [0, 1] (:meth:`crops`)."""
        return self.logits(self.features((crops - self.mean) / self.std))  # type: ignore[no-any-return]


def decode_heatmaps(
    heat: Tensor, regression: Tensor, *, stride: int, top_k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(scores [B, K], labels [B, K] 1-based, boxes [B, K, 4] xyxy in input pixels)`` from per-class score maps
    (:func:`class_scores`) and the box regression.

    A cell counts only where its score is the maximum of its 3 x 3 neighbourhood in that class's map.
    """
    batch, classes, height, width = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    k = min(top_k, classes * height * width)
    scores, flat = peaks.reshape(batch, -1).topk(k, dim=1)
    labels = flat // (height * width) + 1
    cell = flat % (height * width)
    every = regressed_boxes(regression, stride=stride).reshape(batch, 4, height * width)
    boxes = every.gather(2, cell.unsqueeze(1).expand(-1, 4, -1)).transpose(1, 2)
    return scores, labels, boxes


class CenterNet(nn.Module):
    """Backbone, a top-down merge to stride 8, the objectness and box heads, and the crop classifier (see the
    module docstring)."""

    mean: Tensor
    std: Tensor

    def __init__(self, config: CenterNetSettings, *, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.min_size, self.max_size = config.min_size, config.max_size
        self.score_threshold, self.nms_threshold = config.score_threshold, config.nms_threshold
        self.detections_per_image = config.detections_per_image
        self.body = _trunk(
            config.backbone, width=config.backbone_width, pretrained=config.backbone_weights is not None
        )
        channels = config.fpn_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in self.body.channels)
        self.smooth = _conv(channels, channels)
        self.heatmap = _branch(channels, 1)  # class-agnostic: is a garment centred here
        self.box = _branch(channels, 4)
        self.classifier = CropClassifier(num_classes=num_classes, width=max(config.backbone_width, 8))
        # start every cell at a 0.1 object probability, as CenterNet does, so the focal loss starts small
        objectness = self.heatmap[-1]
        assert isinstance(objectness, nn.Conv2d) and objectness.bias is not None
        nn.init.constant_(objectness.bias, -math.log((1 - 0.1) / 0.1))
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def _scale(self, height: int, width: int) -> float:
        return min(self.min_size / min(height, width), self.max_size / max(height, width))

    @staticmethod
    def _padded(images: list[Tensor]) -> Tensor:
        """The images zero-padded to one ``[B, 3, H, W]`` tensor (sides a multiple of 32)."""
        height = -(-max(im.shape[-2] for im in images) // _PAD) * _PAD
        width = -(-max(im.shape[-1] for im in images) // _PAD) * _PAD
        batch = images[0].new_zeros(len(images), 3, height, width)
        for i, im in enumerate(images):
            batch[i, :, : im.shape[-2], : im.shape[-1]] = im
        return batch

    def _batch(self, images: list[Tensor]) -> tuple[Tensor, list[float]]:
        """Resize each image (shorter side ``min_size``, longer at most ``max_size``), normalise, pad to 32."""
        scales, resized = [], []
        for im in images:
            scale = self._scale(int(im.shape[-2]), int(im.shape[-1]))
            size = (max(1, round(im.shape[-2] * scale)), max(1, round(im.shape[-1] * scale)))
            resized.append(
                F.interpolate(im[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            )
            scales.append(scale)
        return (self._padded(resized) - self.mean) / self.std, scales

    def heads(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """``(objectness logits [B, 1, H/8, W/8], regression [B, 4, H/8, W/8])`` of a normalised, padded batch."""
        feats = self.body(batch)
        merged = self.lateral[-1](feats[-1])
        for lateral, feat in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            merged = lateral(feat) + F.interpolate(merged, size=feat.shape[-2:], mode="nearest")
        merged = self.smooth(merged)
        return self.heatmap(merged), self.box(merged)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        batch, scales = self._batch(images)
        logits, regression = self.heads(batch)
        if self.training:
            if targets is None:
                raise ConfigError("a centernet in training mode needs targets")
            return self._losses(images, logits, regression, targets, scales)
        return self._detections(images, logits, regression, scales)

    def _losses(
        self,
        images: list[Tensor],
        logits: Tensor,
        regression: Tensor,
        targets: list[dict[str, Tensor]],
        scales: list[float],
    ) -> dict[str, Tensor]:
        from torchvision.ops import generalized_box_iou_loss

        boxes = [t["boxes"] * s for t, s in zip(targets, scales)]
        heat, box_target, weight = centernet_targets(
            boxes, height=logits.shape[-2], width=logits.shape[-1], stride=STRIDE
        )
        losses = {"loss_heatmap": focal_heatmap_loss(logits, heat)}
        predicted = regressed_boxes(regression, stride=STRIDE)
        cells = weight > 0
        if bool(cells.any()):
            pred = predicted.permute(0, 2, 3, 1)[cells]
            target = box_target.permute(0, 2, 3, 1)[cells]
            giou = generalized_box_iou_loss(pred, target, reduction="none")
            losses["loss_box"] = BOX_LOSS_WEIGHT * (giou * weight[cells]).sum() / weight.sum()
            # the classifier reads the photo at its own resolution: details the detector's small input loses
            boxes = [jittered_boxes(t["boxes"], copies=CROP_COPIES) for t in targets]
            labels = torch.cat([t["labels"].repeat_interleave(CROP_COPIES) for t in targets]) - 1
            crops = self.classifier.crops(self._padded(images), boxes)
            losses["loss_classifier"] = F.cross_entropy(self.classifier(crops), labels)
        else:  # keep the graph (and DDP's used parameters) the same when a batch holds no box
            losses["loss_box"] = predicted.sum() * 0.0
            losses["loss_classifier"] = sum(
                (p.sum() * 0.0 for p in self.classifier.parameters()), logits.sum() * 0.0
            )
        return losses

    def _detections(
        self, images: list[Tensor], logits: Tensor, regression: Tensor, scales: list[float]
    ) -> list[dict[str, Tensor]]:
        from torchvision.ops import nms

        scores, _, boxes = decode_heatmaps(
            logits.sigmoid(), regression, stride=STRIDE, top_k=max(self.detections_per_image, 1)
        )
        kept_scores, kept_boxes = [], []
        for i in range(len(images)):
            b = boxes[i]
            keep = (scores[i] >= self.score_threshold) & (b[:, 2] > b[:, 0] + 1) & (b[:, 3] > b[:, 1] + 1)
            s, b = scores[i][keep], b[keep]
            keep = nms(b, s, self.nms_threshold)
            kept_scores.append(s[keep])
            kept_boxes.append(b[keep] / scales[i])  # the photo's pixels from here on
        crops = self.classifier.crops(self._padded(images), kept_boxes)
        # the crop and its mirror image (garments are left-right symmetric; training flips whole photos)
        probs = (self.classifier(crops).softmax(dim=1) + self.classifier(crops.flip(-1)).softmax(dim=1)) / 2
        out = []
        for im, s, b, p in zip(images, kept_scores, kept_boxes, probs.split([len(b) for b in kept_boxes])):
            height, width = int(im.shape[-2]), int(im.shape[-1])
            top_p, top_c = p.sort(dim=1, descending=True)  # every class, best first
            score = (s[:, None] * top_p).flatten()
            order = score.argsort(descending=True, stable=True)[: self.detections_per_image]
            order = order[score[order] >= self.score_threshold]
            b = b.repeat_interleave(top_c.shape[1], dim=0)[order]
            b = torch.stack(
                [
                    b[:, 0].clamp(0, width),
                    b[:, 1].clamp(0, height),
                    b[:, 2].clamp(0, width),
                    b[:, 3].clamp(0, height),
                ],
                dim=1,
            )
            out.append({"boxes": b, "labels": top_c.flatten()[order] + 1, "scores": score[order]})
        return out
