"""The two-stage CenterNet detector: its targets, its decoding against a slow reference, a training step, a
folder round trip, and a few steps that fit a fixed batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capret.errors import ConfigError
from capret.models.centernet import (
    centernet_targets,
    decode_heatmaps,
    jittered_boxes,
    square_boxes,
)
from capret.models.detector import ClothingDetector, DetectorModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"arch": "centernet", "backbone": "tiny_cnn", "backbone_width": 4, "fpn_channels": 8}


def _model(**overrides: object) -> ClothingDetector:
    torch.manual_seed(0)
    options = {**SMALL, "min_size": 64, "max_size": 64, "score_threshold": 0.0, **overrides}
    return ClothingDetector(DetectorModelConfig(**options))  # type: ignore[arg-type]


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0], [20.0, 30.0, 60.0, 62.0]]),
            "labels": torch.tensor([7, 2]),
        },
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([13])},
    ]


def test_targets_peak_at_centres_and_weigh_every_box_once() -> None:
    apart = [torch.tensor([[0.0, 0.0, 24.0, 32.0], [32.0, 24.0, 64.0, 64.0]])]
    heat, box, weight = centernet_targets(apart, height=8, width=8, stride=8)
    assert heat.shape == (1, 1, 8, 8) and float(heat.max()) == 1.0
    assert (
        float(heat[0, 0, 2, 1]) == 1.0 and float(heat[0, 0, 5, 6]) == 1.0
    )  # centre cells (x, y) = (1, 2), (6, 5)
    assert float(weight.sum()) == pytest.approx(2.0)  # each box weighs one, whatever its size
    assert box[0, :, 2, 1].tolist() == [0.0, 0.0, 24.0, 32.0] and box[0, :, 5, 6].tolist() == [
        32.0,
        24.0,
        64.0,
        64.0,
    ]
    nested = [torch.tensor([[0.0, 0.0, 64.0, 64.0], [24.0, 24.0, 40.0, 40.0]])]
    heat, box, weight = centernet_targets(nested, height=8, width=8, stride=8)
    assert float(heat[0, 0, 4, 4]) == 1.0  # both centres (32, 32) fall in cell (4, 4)
    assert box[0, :, 4, 4].tolist() == [24.0, 24.0, 40.0, 40.0]  # the smaller box keeps the shared cell
    corner = (weight[0] > 0) & (box[0, 0] == 0.0)
    assert bool(corner.any())  # the big box keeps cells of its own away from the small one


def _slow_decode(heat: torch.Tensor, k: int) -> list[list[tuple[float, int, int]]]:
    """Every cell that is the maximum of its 3 x 3 neighbourhood in its class map, best first."""
    out = []
    batch, classes, height, width = heat.shape
    for b in range(batch):
        peaks = []
        for c in range(classes):
            for y in range(height):
                for x in range(width):
                    window = heat[b, c, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
                    if heat[b, c, y, x] >= window.max():
                        peaks.append((float(heat[b, c, y, x]), c + 1, y * width + x))
        peaks.sort(key=lambda p: -p[0])
        out.append(peaks[:k])
    return out


def test_decoding_matches_the_slow_reference() -> None:
    torch.manual_seed(1)
    heat = torch.rand(2, 3, 5, 6)
    regression = torch.randn(2, 4, 5, 6) * 0.3
    scores, labels, boxes = decode_heatmaps(heat, regression, stride=8, top_k=7)
    for b, expected in enumerate(_slow_decode(heat, 7)):
        assert scores[b].tolist() == pytest.approx([p[0] for p in expected])
        assert labels[b].tolist() == [p[1] for p in expected]
        for j, (_, _, cell) in enumerate(
            expected
        ):  # the box is the peak cell's centre -/+ exp(distances) * 8
            y, x = divmod(cell, 6)
            cx, cy = (x + 0.5) * 8, (y + 0.5) * 8
            d = regression[b, :, y, x].exp() * 8
            reference = [cx - float(d[0]), cy - float(d[1]), cx + float(d[2]), cy + float(d[3])]
            assert boxes[b, j].tolist() == pytest.approx(reference, abs=1e-4)


def test_square_and_jittered_crops_keep_the_box_centre_and_shape() -> None:
    box = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    assert square_boxes(box, margin=1.0).tolist() == [[0.0, 20.0, 40.0, 60.0]]
    jittered = jittered_boxes(box, copies=5, generator=torch.Generator().manual_seed(0))
    assert jittered.shape == (5, 4)
    centres = (jittered[:, :2] + jittered[:, 2:]) / 2
    assert bool(((centres - torch.tensor([20.0, 40.0])).abs() <= torch.tensor([2.0, 4.0]) + 1e-5).all())
    sizes = jittered[:, 2:] - jittered[:, :2]
    assert bool(
        (sizes >= torch.tensor([18.0, 36.0]) - 1e-4).all() and (sizes <= torch.tensor([24.0, 48.0])).all()
    )


def test_training_step_and_predictions() -> None:
    model = _model()
    model.train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    losses = model(images, _targets())
    assert isinstance(losses, dict) and set(losses) == {"loss_heatmap", "loss_box", "loss_classifier"}
    sum(losses.values()).backward()  # type: ignore[union-attr]
    assert all(p.grad is not None for p in model.parameters())
    empty = model(images, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2)
    assert (
        isinstance(empty, dict) and float(empty["loss_box"].detach()) == 0.0
    )  # no box: the graph still runs
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert isinstance(outputs, list) and len(outputs) == 2
    for image, out in zip(images, outputs):
        boxes, scores, labels = out["boxes"], out["scores"], out["labels"]
        assert 0 < len(boxes) <= 100 and len(scores) == len(labels) == len(boxes)
        assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= image.shape[-1]).all())
        assert bool((boxes[:, 3] <= image.shape[-2]).all() and (labels >= 1).all() and (labels <= 13).all())
        assert scores.tolist() == sorted(scores.tolist(), reverse=True)
        # each box is reported under every class (score threshold 0 here), its best class first
        first = boxes[0]
        same = (boxes == first).all(dim=1)
        assert int(same.sum()) == 13 and sorted(labels[same].tolist()) == list(range(1, 14))


def test_folder_round_trip_gives_the_same_predictions(tmp_path: Path) -> None:
    model = _model().eval()
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        before = model(images)[0]
    loaded = ClothingDetector.from_pretrained(model.save_pretrained(tmp_path / "det"))
    with torch.no_grad():
        after = loaded(images)[0]  # type: ignore[index]
    assert loaded.config.arch == "centernet"
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(before[key], after[key])


def test_a_few_steps_fit_a_fixed_batch() -> None:
    model = _model(backbone_width=8, fpn_channels=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    images = [torch.rand(3, 64, 64) * 0.2 for _ in range(2)]
    for image, target in zip(images, _targets()):
        for x1, y1, x2, y2 in target["boxes"].int().tolist():
            image[:, y1:y2, x1:x2] += 0.6  # visible garments on a dark background
    model.train()
    first = None
    for _ in range(30):
        losses = model(images, _targets())
        loss = sum(losses.values())  # type: ignore[union-attr]
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
    assert float(loss.detach()) < 0.5 * first


def test_bad_centernet_options_are_named() -> None:
    with pytest.raises(ConfigError, match="tiny_cnn"):
        _model(backbone="resnet18")
    with pytest.raises(ConfigError, match="no pretrained"):
        _model(backbone_weights="DEFAULT")
    with pytest.raises(ConfigError, match="weights"):
        _model(weights="DEFAULT")
