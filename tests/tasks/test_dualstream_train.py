"""Task ``dualstream`` end to end on CPU: capret-train lowers the loss, resume continues exactly, the exported
model loads, and capret-eval scores a checkpoint with and without captions (official top-k = R@k)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_text import build_tiny_bert, write_synthetic_df2  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("df2")
    stores = write_synthetic_df2(root / "data", identities={"train": 8, "validation": 4}, user_views=2)
    bert = build_tiny_bert(root / "bert")
    config = {
        "task": "dualstream",
        "data": {
            "root": str(root / "data"),
            "captions": str(stores["train"]),
            "val_captions": str(stores["validation"]),
            "p": 4,
            "k": 3,
            "caption_dropout": 0.3,
        },
        "model": {
            "visual": {"kind": "timm", "source": "test_resnet", "image_size": 32},
            "text": {
                "kind": "hf_text",
                "source": str(bert),
                "pretrained": True,
                "max_length": 16,
                "freeze": True,
            },
            "width": 32,
            "depth": 1,
            "heads": 2,
            "embed_dim": 32,
            "itc_dim": 16,
        },
        "loss": {"itc_weight": 0.2, "box_weight": 0.2},
        "trainer": {
            "output_dir": str(root / "run"),
            "max_steps": 24,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 1,
            "amp": "off",
            "progress": False,
            "tensorboard": False,
        },
        "eval": {"ks": [1, 2, 4], "batch_size": 8},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": path, "run": root / "run", "data": root / "data", **stores}


def _losses(run: Path) -> list[float]:
    with open(run / "train_log.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def test_train_lowers_loss_and_exports_a_loadable_model(
    setup: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    from capret.cli.train import main

    assert main(["--config", str(setup["config"])]) == 0
    result = json.loads(capsys.readouterr().out)
    losses = _losses(setup["run"])
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    with open(setup["run"] / "train_log.csv") as fh:
        columns = next(csv.reader(fh))
    for term in ("arcface", "itc", "box", "box_l1", "box_giou", "lr/model", "lr/arcface"):
        assert term in columns  # every term logged, ArcFace in its own parameter group
    # 5% of 8 train identities rounds up to one held-out identity (3 items): selection never sees validation
    assert result["holdout_items"] == 3 and result["selection"] == "holdout train identities"
    assert result["captions_found"] == 21 and result["captions_missing"] == 0
    assert result["caption_source"] == {"unrecorded": 24}  # the synthetic store predates the provenance field
    assert result["metrics"]["num_queries"] == 2  # the user items of the held-out identity
    final = result["final_metrics"]  # the reported split, evaluated once after training
    assert final["split"] == "validation" and final["num_queries"] == 8
    assert json.loads((setup["run"] / "final_metrics.json").read_text()) == final
    for metrics in (result["metrics"], final):
        for key in ("map", "map_no_captions", "recall@1", "recall@1_no_captions"):
            assert 0.0 <= metrics[key] <= 1.0

    import capret

    model = capret.load_model(result["model_dir"])
    feats = model.encode_images(sorted((setup["data"] / "validation" / "image").glob("*.jpg"))[:5])
    assert feats.shape == (5, 32)
    import numpy as np

    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    from_checkpoint = capret.load_model(setup["run"] / "best")  # a training checkpoint loads too
    np.testing.assert_allclose(
        from_checkpoint.encode_images(sorted((setup["data"] / "validation" / "image").glob("*.jpg"))[:5]),
        feats,
        atol=1e-5,
    )


def test_eval_checkpoint_with_and_without_captions(
    setup: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    from capret.cli.eval import main

    if not (setup["run"] / "model").is_dir():
        pytest.skip("needs the trained run of the previous test")
    base = ["--metric", "map", "--checkpoint", str(setup["run"] / "model"), "--dataset", "demo"]
    base += ["--root", str(setup["data"]), "--split", "validation", "--ks", "1", "2", "4"]
    assert main([*base, "--captions", str(setup["validation"]), "--out", str(setup["root"] / "eval")]) == 0
    with_captions = json.loads(capsys.readouterr().out)
    assert with_captions["num_queries"] == 8 and with_captions["captions_found"] == 12
    for k in (1, 2, 4):  # with ground-truth boxes the official protocol must agree with R@k
        assert with_captions[f"official_top{k}"] == pytest.approx(with_captions[f"recall@{k}"])
    assert (setup["root"] / "eval" / "results.json").is_file()
    assert 0.0 <= with_captions["box_miou"] <= 1.0 and with_captions["box_count"] == 12.0
    for picture in ("grid_png", "recall_png"):
        assert Path(with_captions[picture]).stat().st_size > 0
    assert main([*base, "--no-captions"]) == 0
    without = json.loads(capsys.readouterr().out)
    assert without["captions"] == "none" and 0.0 <= without["map"] <= 1.0
    assert main([*base, "--captions", str(setup["validation"]), "--no-captions"]) == 2
    capsys.readouterr()
    corrupt = ["--captions", str(setup["validation"]), "--corrupt-captions", "drop", "shuffle", "replace"]
    assert main([*base, *corrupt, "--corrupt-rates", "0", "0.5", "1"]) == 0
    swept = json.loads(capsys.readouterr().out)
    curves = swept["caption_corruption"]["modes"]
    assert [point["rate"] for point in curves["drop"]] == [0.0, 0.5, 1.0]
    for mode in ("drop", "shuffle", "replace"):  # rate 0 is the uncorrupted evaluation
        assert curves[mode][0]["map"] == pytest.approx(with_captions["map"], abs=1e-6)
    assert curves["drop"][-1]["map"] == pytest.approx(without["map"], abs=1e-6)  # all dropped = image only
    assert swept["caption_source"] == {"unrecorded": 12}  # the synthetic store predates the field
    assert main([*base, "--no-captions", "--corrupt-captions", "drop"]) == 2


def test_resume_continues_the_same_loss_curve(setup: dict[str, Path], tmp_path: Path) -> None:
    from capret.config import load_config
    from capret.tasks.dualstream import DualStreamConfig, run

    common = ["trainer.max_steps=6", "trainer.save_every=3", "data.val_split=", "trainer.keep_last=0"]
    straight = load_config(
        DualStreamConfig, setup["config"], [*common, f"trainer.output_dir={tmp_path / 'a'}"]
    )
    run(straight)
    middle = tmp_path / "a" / "checkpoints" / "step_00000003"
    assert (middle / "checkpoint.json").is_file()
    resumed = load_config(
        DualStreamConfig, setup["config"], [*common, f"trainer.output_dir={tmp_path / 'b'}"]
    )
    run(resumed, resume=str(middle))
    assert _losses(tmp_path / "b")[-3:] == pytest.approx(_losses(tmp_path / "a")[-3:], rel=1e-5, abs=1e-6)


def test_quickstart_stage_reports_before_after_and_ablation(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import copy

    import capret
    import capret.quickstart.dual_stream as stage
    from capret.quickstart import QuickstartContext

    recipe = copy.deepcopy(stage.DEMO_RECIPE)
    config = yaml.safe_load(setup["config"].read_text())
    recipe["model"] = config["model"]  # the tiny architecture instead of ResNet-18 + MiniLM
    recipe["data"].update(p=4, k=3)
    recipe["trainer"].update(max_steps=4, tensorboard=False, progress=False)
    recipe["eval"]["ks"] = [1, 2, 4]
    monkeypatch.setattr(stage, "DEMO_RECIPE", recipe)
    ctx = QuickstartContext(out_dir=tmp_path, data_root=setup["data"], seed=0, train_seconds=60)
    ctx.state["captions"] = {"train": setup["train"], "validation": setup["validation"]}
    result = stage.run(ctx)
    for key in ("map_before", "map_after", "map_after_no_captions", "recall@1_before", "recall@1_after",
                "map_image_only_trained", "map_category_filtered_baseline"):  # fmt: skip
        assert 0.0 <= result[key] <= 1.0
    assert result["train_steps"] == 4 and result["model_dir"] == str(tmp_path / "model")
    assert result["train_steps_image_only"] == 4 and result["model_dir_image_only"] == str(
        tmp_path / "model_image_only"
    )
    # the synthetic stores predate the provenance fields: the report says so instead of claiming pixels
    assert result["caption_source"] == "unrecorded" and result["oracle_captions"] is False
    state = ctx.state["dual_stream"]
    assert state["query_features"].shape == (8, 32) and len(state["gallery_images"]) == 4
    reloaded = capret.load_model(result["model_dir"])
    assert reloaded.embed_dim == 32


@pytest.mark.parametrize("name", ["demo_dualstream.yaml", "garments_dualstream.yaml"])
def test_demo_config_file_follows_the_quickstart_recipe(configs_dir: Path, name: str) -> None:
    """Both shipped configs say they are the quickstart's recipe (the garment one with the world's paths)."""
    import capret.quickstart.dual_stream as stage

    shipped = yaml.safe_load((configs_dir / name).read_text())
    recipe = stage.DEMO_RECIPE
    for section in ("data", "model", "loss", "trainer"):
        for key, value in recipe[section].items():
            assert shipped[section][key] == value, (name, section, key)
    assert shipped["trainer"]["max_seconds"] == stage.DEFAULT_TRAIN_SECONDS
    for name in (
        "demo_dualstream.yaml",
        "deepfashion2_dualstream.yaml",
    ):  # selection on held-out train identities
        assert yaml.safe_load((configs_dir / name).read_text())["data"]["holdout_identities"] == 0.05


def test_full_mode_box_head_is_masked_and_reported(setup: dict[str, Path], tmp_path: Path) -> None:
    """``mode: full``: the box target is the item in the whole image; samples without a caption give no box
    loss; validation reports the grounding quality (mean IoU, IoU >= 0.5 rate)."""
    import torch

    from capret.config import load_config
    from capret.tasks.dualstream import DualStreamConfig, DualStreamTask, run

    overrides = ["model.mode=full", "trainer.max_steps=3", f"trainer.output_dir={tmp_path / 'full'}"]
    config = load_config(DualStreamConfig, setup["config"], overrides)
    task = DualStreamTask(config)
    module = task.build_model()
    batch = next(iter(task.train_dataloader(rank=0, world_size=1, epoch=0, seed=0)))
    assert (batch["box"][:, 2:] < 0.95).all()  # whole image: the item is smaller than the frame
    batch["has_caption"][:] = False
    terms = module(batch)
    assert terms["box"].item() == 0.0 and terms["itc"].item() == 0.0
    batch["has_caption"][0] = True
    assert module(batch)["box"].item() > 0.0
    result = run(config)
    assert 0.0 <= result["metrics"]["box_miou"] <= 1.0  # model selection on the held-out train identities
    metrics = result["final_metrics"]  # the reported split, evaluated once
    assert 0.0 <= metrics["box_miou"] <= 1.0 and 0.0 <= metrics["box_iou@0.5"] <= 1.0
    assert metrics["box_count"] == 12.0  # every captioned validation item (4 shop + 8 user)
    assert torch.isfinite(torch.tensor(metrics["map"]))


def test_loader_workers_and_decoders_give_the_in_process_batch(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """One worker process (persistent, pinned only on CUDA) and the torchvision decoder give the same first batch
    as today's in-process PIL loader: sample seeds, not worker scheduling, decide the augmentations."""
    import torch

    from capret.config import load_config
    from capret.tasks.dualstream import DualStreamConfig, DualStreamTask

    def first_batch(*overrides: str) -> tuple[torch.utils.data.DataLoader, dict]:
        config = load_config(
            DualStreamConfig, setup["config"], [*overrides, f"trainer.output_dir={tmp_path / 'run'}"]
        )
        task = DualStreamTask(config)
        task.build_model()
        loader = task.train_dataloader(rank=0, world_size=1, epoch=0, seed=0)
        return loader, next(iter(loader))

    reference_loader, reference = first_batch()
    assert not reference_loader.persistent_workers and not reference_loader.pin_memory
    loader, batch = first_batch("trainer.num_workers=1", "data.decode=torchvision")
    assert loader.persistent_workers and not loader.pin_memory  # CPU device: nothing to pin for
    for key in ("pixels", "box", "label", "index", "input_ids", "has_caption"):
        assert torch.equal(batch[key], reference[key]), key
