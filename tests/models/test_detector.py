"""The clothing detector model: every backbone family builds, trains one step, predicts and round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capret.models.detector import NUM_CLASSES, ClothingDetector, DetectorModelConfig, list_backbones

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {
    "min_size": 64,
    "max_size": 64,
    "box_head_width": 32,
    "rpn_proposals_train": 50,
    "rpn_proposals_test": 20,
}


def _target(masks: bool) -> dict[str, torch.Tensor]:
    target = {"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([7])}
    if masks:
        mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
        mask[0, 10:50, 8:40] = 1
        target["masks"] = mask
    return target


@pytest.mark.parametrize(
    ("arch", "backbone"),
    [
        ("faster_rcnn", "mobilenet_v3_small"),
        ("faster_rcnn", "resnet18"),
        ("mask_rcnn", "resnet18"),
        ("faster_rcnn", "timm:resnet18"),
    ],
)
def test_backbones_train_and_predict(arch: str, backbone: str) -> None:
    torch.manual_seed(0)
    model = ClothingDetector(DetectorModelConfig(arch=arch, backbone=backbone, fpn_channels=32, **SMALL))
    assert model.net.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES
    model.train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    losses = model(images, [_target(model.has_masks), _target(model.has_masks)])
    assert isinstance(losses, dict)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert expected | ({"loss_mask"} if arch == "mask_rcnn" else set()) == set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert isinstance(out, list) and len(out) == 2
    assert out[0]["boxes"].shape[1] == 4 and bool((out[0]["labels"] >= 1).all())


def test_save_and_load_give_the_same_predictions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = DetectorModelConfig(backbone="mobilenet_v3_small", score_threshold=0.0, **SMALL)
    model = ClothingDetector(config).eval()
    model.save_pretrained(tmp_path / "det")
    loaded = ClothingDetector.from_pretrained(tmp_path / "det")
    image = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        a, b = model(image)[0], loaded(image)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_pretrained_backbone_keeps_its_structure_in_the_folder(tmp_path: Path) -> None:
    """A folder of a model trained from pretrained weights rebuilds offline (frozen BN recorded, no download)."""
    config = DetectorModelConfig(backbone="resnet18", frozen_bn=True, **SMALL)
    ClothingDetector(config).save_pretrained(tmp_path / "det")
    loaded = ClothingDetector.from_pretrained(tmp_path / "det")
    assert loaded.config.frozen_bn is True and loaded.config.backbone_weights is None


def test_bad_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="mobilenet_v3_large"):
        ClothingDetector(DetectorModelConfig(backbone="vgg16"))
    with pytest.raises(ValueError, match="faster_rcnn\\+resnet50"):
        ClothingDetector(DetectorModelConfig(backbone="resnet18", weights="DEFAULT"))
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        ClothingDetector(DetectorModelConfig(backbone="resnet18", backbone_weights="NOPE"))
    assert "timm:<name>" in list_backbones()


def test_pretrained_weights_resolve_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names resolve to torchvision weight enums and timm's pretrained flag (nothing is downloaded here)."""
    import timm
    from torchvision.models import ResNet18_Weights
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    from capret.models import detector as module

    assert module._weights_enum("resnet18", "DEFAULT") is ResNet18_Weights.DEFAULT
    assert module._weights_enum("resnet18", "IMAGENET1K_V1") is ResNet18_Weights.IMAGENET1K_V1
    assert (
        module._weights_enum("fasterrcnn_resnet50_fpn", "DEFAULT") is FasterRCNN_ResNet50_FPN_Weights.DEFAULT
    )
    seen: dict[str, object] = {}
    real = timm.create_model

    def spy(name: str, **kwargs: object) -> object:
        seen.update(name=name, **kwargs)
        return real(name, **{**kwargs, "pretrained": False})

    monkeypatch.setattr(timm, "create_model", spy)
    ClothingDetector(
        DetectorModelConfig(backbone="timm:resnet18", backbone_weights="DEFAULT", fpn_channels=16, **SMALL)
    )
    assert seen == {"name": "resnet18", "pretrained": True, "features_only": True}
