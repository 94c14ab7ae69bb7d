"""Task ``detector``: ``capret-train`` trains the clothing detector on a synthetic DeepFashion2 layout, selects the
checkpoint on held-out train images, scores the validation split once with box AP (pycocotools) and exports a
folder that ``load_detector`` reads; its parts are checked against references."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny_text import write_synthetic_df2

import capret
from capret.cli.train import main
from capret.config import from_dict, load_config, to_dict
from capret.errors import ConfigError
from capret.evaluation.detection import coco_detection_ap
from capret.inference.detectors import Detection, create_detector, load_detector
from capret.tasks.detector import (
    CocoDetectionDataset,
    DetectorConfig,
    DetectorTask,
    FlipBatchSampler,
    load_coco_split,
    one_result_per_box,
    split_holdout_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("det") / "df2"
    write_synthetic_df2(root, identities={"train": 4, "validation": 2}, user_views=2, size=64)
    return root


def _config(data: Path, out: Path) -> Path:
    config = {
        "task": "detector",
        "data": {"root": str(data), "batch_size": 2},
        "model": {
            "backbone": "mobilenet_v3_small",
            "min_size": 64,
            "max_size": 64,
            "box_head_width": 32,
            "rpn_proposals_train": 50,
            "rpn_proposals_test": 20,
            "score_threshold": 0.0,
        },
        "trainer": {
            "output_dir": str(out),
            "max_steps": 2,
            "lr": 1e-3,
            "amp": "off",
            "log_every": 1,
            "tensorboard": False,
            "progress": False,
        },
    }
    path = out.parent / "detector.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_capret_train_detector_end_to_end(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["--config", str(_config(data, run))]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 2 and result["monitor"] == "box_ap"
    metrics = result["metrics"]  # selection: the default 5% of the 12 train images, i.e. one held-out image
    assert 0.0 <= metrics["box_ap"] <= 1.0 and 0.0 <= metrics["box_ap_any_class"] <= 1.0
    assert metrics["val_images"] == 1 and result["holdout_images"] == 1 and result["train_images"] == 11
    final = result["final_metrics"]  # the reported split, scored once with the exported weights
    assert final["split"] == "validation" and final["val_images"] == 6 and 0.0 <= final["box_ap"] <= 1.0
    assert json.loads((run / "final_metrics.json").read_text()) == final
    assert (run / "checkpoints" / "step_00000002" / "model.safetensors").is_file()
    assert (run / "coco_train.json").is_file()  # the COCO export is cached in the run folder
    detector = load_detector(run, max_items=3, score_threshold=0.0)  # run folder -> run/model
    from PIL import Image

    image = Image.open(data / "validation" / "image" / "000001.jpg").convert("RGB")
    found = detector.detect([image, image])
    assert len(found) == 2 and found[0] == found[1] and 0 < len(found[0]) <= 3
    assert all(isinstance(d, Detection) and 1 <= (d.category_id or 0) <= 13 for d in found[0])
    assert [d.score for d in found[0]] == sorted((d.score for d in found[0]), reverse=True)
    registered = create_detector(
        "deepfashion2_detector", path=str(run / "model"), max_items=3, score_threshold=0.0
    )
    # one image at a time on both sides: a batch of two pads differently and moves boxes in the 6th digit
    single = detector.detect([image])
    assert registered.detect([image]) == single and len(single[0]) == len(found[0])
    for alone, batched in zip(single[0], found[0]):
        assert alone.box == pytest.approx(batched.box, abs=1e-3) and alone.category_id == batched.category_id
    # the folder says its kind; a folder written before kind existed (capret_detector.json) still loads
    meta = json.loads((run / "model" / "capret_model.json").read_text())
    assert meta["kind"] == "detector" and meta["format"] == "capret.detector/1"
    legacy = tmp_path / "legacy"
    shutil.copytree(run / "model", legacy)
    del meta["kind"]
    (legacy / "capret_detector.json").write_text(json.dumps(meta))
    (legacy / "capret_model.json").unlink()
    old = capret.load(legacy, kind="detector")
    old.score_threshold, old.max_items = 0.0, 3
    assert old.detect([image]) == single
    # resume: two more steps from the finished run's last checkpoint
    assert main(["--config", str(_config(data, run)), "--resume", "auto", "trainer.max_steps=3"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3


def test_flip_sampler_is_deterministic_and_shards_ranks() -> None:
    whole = FlipBatchSampler(10, batch_size=4, flip=True, seed=3, epoch=1, rank=0, world_size=1).batches
    again = FlipBatchSampler(10, batch_size=4, flip=True, seed=3, epoch=1, rank=0, world_size=1).batches
    assert whole == again and len(whole) == 2
    ranks = [
        FlipBatchSampler(10, batch_size=2, flip=True, seed=3, epoch=1, rank=r, world_size=2).batches
        for r in (0, 1)
    ]
    for step in range(2):  # rank 0's batch + rank 1's batch = the single-process batch
        assert ranks[0][step] + ranks[1][step] == whole[step]
    other = FlipBatchSampler(10, batch_size=4, flip=True, seed=3, epoch=2, rank=0, world_size=1).batches
    assert other != whole
    assert all(colour == -1 for batch in whole for _, _, colour in batch)  # recolour 0: colours kept
    recoloured = FlipBatchSampler(
        10, batch_size=4, flip=True, seed=3, epoch=1, rank=0, world_size=1, recolour=1.0
    )
    assert [[k[:2] for k in b] for b in recoloured.batches] == [
        [k[:2] for k in b] for b in whole
    ]  # same flips
    assert all(colour >= 0 for batch in recoloured.batches for _, _, colour in batch)


def test_recolour_is_a_pure_function_of_its_seed(data: Path) -> None:
    from capret.tasks.detector import recolour

    coco = load_coco_split(root=data, split="train", coco_file=None, cache_dir=None)
    dataset = CocoDetectionDataset(coco, image_root=data / "train" / "image", masks=False)
    pixels, target = dataset[(0, False)]
    again, target_again = dataset[(0, False, 5)]
    assert torch.equal(again, recolour(pixels, 5)) and torch.equal(target_again["boxes"], target["boxes"])
    assert torch.equal(dataset[(0, False, 5)][0], again) and not torch.equal(recolour(pixels, 6), again)
    assert again.shape == pixels.shape and float(again.min()) >= 0.0 and float(again.max()) <= 1.0
    assert torch.equal(dataset[(0, False, -1)][0], pixels)


def test_dataset_flips_boxes_and_masks(data: Path) -> None:
    coco = load_coco_split(root=data, split="train", coco_file=None, cache_dir=None)
    dataset = CocoDetectionDataset(coco, image_root=data / "train" / "image", masks=True)
    pixels, target = dataset[(0, False)]
    flipped, target_f = dataset[(0, True)]
    width = pixels.shape[-1]
    assert torch.equal(flipped, pixels.flip(-1))
    x1, y1, x2, y2 = target["boxes"][0].tolist()
    assert target_f["boxes"][0].tolist() == [width - x2, y1, width - x1, y2]
    assert torch.equal(target_f["masks"], target["masks"].flip(-1))
    # the polygon mask covers the box (the synthetic polygons are the boxes)
    ys, xs = np.nonzero(target["masks"][0].numpy())
    assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1 and abs(ys.min() - y1) <= 1


def test_coco_ap_of_perfect_and_wrong_detections(data: Path) -> None:
    coco = load_coco_split(root=data, split="validation", coco_file=None, cache_dir=None)
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in coco["annotations"]
    ]
    assert coco_detection_ap(coco, perfect)["ap"] == pytest.approx(1.0)
    wrong_class = [{**r, "category_id": r["category_id"] % 13 + 1} for r in perfect]
    assert coco_detection_ap(coco, wrong_class)["ap"] == 0.0
    assert coco_detection_ap(coco, wrong_class, use_categories=False)["ap"] == pytest.approx(1.0)
    shifted = [{**r, "bbox": [r["bbox"][0] + r["bbox"][2] * 0.3, *r["bbox"][1:]]} for r in perfect]
    assert (
        0.0 < coco_detection_ap(coco, shifted)["ap"] < 1.0
    )  # IoU 0.54: counted only at the 0.5/0.55 thresholds
    assert coco_detection_ap(coco, [])["ap"] == 0.0


def test_a_box_under_several_classes_is_one_item_when_classes_do_not_matter() -> None:
    from capret.inference.detectors import _detections

    box, other = [1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 20.0, 20.0]
    results = [
        {"image_id": 1, "category_id": 3, "bbox": box, "score": 0.4},
        {"image_id": 1, "category_id": 5, "bbox": box, "score": 0.9},
        {"image_id": 2, "category_id": 3, "bbox": box, "score": 0.2},  # another image: its own item
        {"image_id": 1, "category_id": 3, "bbox": other, "score": 0.5},
    ]
    kept = one_result_per_box(results)
    assert sorted((r["image_id"], r["category_id"], r["score"]) for r in kept) == [
        (1, 3, 0.5),
        (1, 5, 0.9),
        (2, 3, 0.2),
    ]
    # the pipeline's detector: each box once, under its best class, best first, at most max_items
    output = {
        "boxes": torch.tensor([[1.0, 2.0, 31.0, 42.0], [1.0, 2.0, 31.0, 42.0], [5.0, 5.0, 25.0, 25.0]]),
        "scores": torch.tensor([0.4, 0.9, 0.5]),
        "labels": torch.tensor([3, 5, 3]),
    }
    found = _detections(output, score_threshold=0.0, max_items=10)
    assert [(d.category_id, round(d.score, 2)) for d in found] == [(5, 0.9), (3, 0.5)]
    assert len(_detections(output, score_threshold=0.0, max_items=1)) == 1
    assert [d.category_id for d in _detections(output, score_threshold=0.45, max_items=10)] == [5, 3]


def test_configs_parse_and_demo_yaml_is_the_quickstart_recipe(configs_dir: Path) -> None:
    from capret.quickstart.detector import DEMO_RECIPE

    full = load_config(DetectorConfig, configs_dir / "deepfashion2_detector.yaml")
    assert full.model.weights == "DEFAULT" and full.trainer.monitor == "box_ap"
    # the full recipe selects checkpoints on held-out train images, never on the reported split
    assert full.trainer.eval_every > 0 and full.data.holdout_images == 0.05
    demo = to_dict(load_config(DetectorConfig, configs_dir / "demo_detector.yaml"))
    recipe = to_dict(from_dict(DetectorConfig, copy.deepcopy(DEMO_RECIPE)))
    assert demo["model"] == recipe["model"] and demo["eval"]["max_images"] == recipe["eval"]["max_images"]
    for key in (
        "lr",
        "batch_size",
        "flip",
        "recolour",
        "holdout_images",
        "schedule",
        "warmup_steps",
        "eval_every",
    ):
        section = "data" if key in ("batch_size", "flip", "recolour", "holdout_images") else "trainer"
        assert demo[section][key] == recipe[section][key]


def _tiny_centernet(data: Path, out: Path, **data_section: object) -> DetectorConfig:
    """A CenterNet of a few thousand weights on the synthetic world: trains and scores in about a second."""
    from capret.quickstart.detector import DEMO_RECIPE

    recipe = copy.deepcopy(DEMO_RECIPE)
    recipe["data"].update(root=str(data), batch_size=2, recolour=0.0, **data_section)
    recipe["model"].update(backbone_width=4, fpn_channels=8, min_size=64, max_size=64)
    recipe["trainer"].update(output_dir=str(out), max_steps=2, log_every=1, progress=False)
    return from_dict(DetectorConfig, recipe)


def _ids(coco: dict[str, object]) -> set[int]:
    return {int(im["id"]) for im in coco["images"]}  # type: ignore[attr-defined,index]


def test_held_out_images_are_disjoint_from_training_and_fixed_by_the_seed(data: Path) -> None:
    coco = load_coco_split(root=data, split="train", coco_file=None, cache_dir=None)
    train, held = split_holdout_images(coco, fraction=0.25, seed=0)
    assert len(held["images"]) == 3 and len(train["images"]) == 9  # round(0.25 * 12)
    assert not _ids(train) & _ids(held) and _ids(train) | _ids(held) == _ids(coco)
    # whole images: every annotation goes with its image
    assert {a["image_id"] for a in held["annotations"]} == _ids(held)
    assert {a["image_id"] for a in train["annotations"]} == _ids(train)
    assert len(train["annotations"]) + len(held["annotations"]) == len(coco["annotations"])
    again = split_holdout_images(coco, fraction=0.25, seed=0)[1]
    shuffled = {**coco, "images": coco["images"][::-1]}  # the draw is over sorted ids, not the file's order
    assert _ids(again) == _ids(held) == _ids(split_holdout_images(shuffled, fraction=0.25, seed=0)[1])
    others = {frozenset(_ids(split_holdout_images(coco, fraction=0.25, seed=s)[1])) for s in range(1, 6)}
    assert others - {frozenset(_ids(held))}  # another seed, other photos
    # a tiny share still holds one image out, a large one keeps one image to train on; 0 holds none out
    assert len(split_holdout_images(coco, fraction=0.01, seed=0)[1]["images"]) == 1
    assert len(split_holdout_images(coco, fraction=0.99, seed=0)[0]["images"]) == 1
    assert split_holdout_images(coco, fraction=0.0, seed=0) == (
        coco,
        {**coco, "images": [], "annotations": []},
    )


def test_holdout_share_out_of_range_is_a_config_error(data: Path, tmp_path: Path) -> None:
    for share in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"data\.holdout_images"):
            DetectorTask(_tiny_centernet(data, tmp_path / "run", holdout_images=share))


def test_selection_scores_the_holdout_and_the_val_split_is_scored_once(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import capret.tasks.detector as detector_task
    from capret.inference.detectors import predict_coco

    scored: list[set[int]] = []  # the image ids of every scoring, in order

    def recording(model: object, *, coco: dict[str, object], **kwargs: object) -> object:
        scored.append(_ids(coco))
        return predict_coco(model, coco=coco, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(detector_task, "predict_coco", recording)
    config = _tiny_centernet(data, tmp_path / "run", holdout_images=0.25)
    config.trainer.eval_every = 1
    task = DetectorTask(config)
    held = _ids(task.holdout_coco)
    trained = {int(im["id"]) for im in task.dataset.images}
    assert len(held) == 3 and not held & trained

    result = detector_task.run(config)
    val_ids = _ids(load_coco_split(root=data, split="validation", coco_file=None, cache_dir=None))
    # steps 1 and 2 validated on the held-out train images only; then the val split, once
    assert scored == [held, held, val_ids]
    assert result["selection"] == "holdout train images" and result["holdout_images"] == 3
    assert result["best_checkpoint"] is not None and result["metrics"]["val_images"] == 3
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final == result["final_metrics"] and final["split"] == "validation" and final["val_images"] == 6
    assert {"box_ap", "box_ap50", "box_ap_any_class", "box_ap50_any_class"} <= set(final)


def test_without_a_holdout_the_last_weights_are_exported_and_still_scored_once(
    data: Path, tmp_path: Path
) -> None:
    from capret.tasks.detector import run

    config = _tiny_centernet(data, tmp_path / "run", holdout_images=0.0)
    config.trainer.eval_every = 1
    result = run(config)
    assert result["metrics"] == {} and result["best_checkpoint"] is None
    assert result["selection"] == "none (last weights)" and result["train_images"] == 12
    assert result["final_metrics"]["val_images"] == 6
    assert (tmp_path / "run" / "final_metrics.json").is_file()
