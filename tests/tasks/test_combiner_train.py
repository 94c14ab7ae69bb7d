"""CLIP4Cir two-stage training through ``capret-train`` and CIR evaluation through ``capret-eval``.

A tiny random CLIP (tokenizer trained on the fly, loaded with ``from_pretrained``) and tiny FashionIQ / CIRR /
CIRCO folders built from a few real annotation records with placeholder images.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from repo_paths import CONFIGS as REPO_CONFIGS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_cir import make_tiny_clip, write_circo, write_cirr, write_fashioniq  # noqa: E402

import capret  # noqa: E402
from capret.cli import eval as eval_cli  # noqa: E402
from capret.cli import train as train_cli  # noqa: E402
from capret.config import load_config  # noqa: E402
from capret.models.folder import folder_kind  # noqa: E402
from capret.tasks.combiner import CombinerTask, CombinerTaskConfig  # noqa: E402

CONFIGS = REPO_CONFIGS
QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.amp='off'", "trainer.num_workers=0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cir")
    return {
        "base": base,
        "clip": make_tiny_clip(base / "clip"),
        "fiq": write_fashioniq(base / "fiq"),
        "cirr": write_cirr(base / "cirr"),
    }


def _losses(run_dir: Path) -> list[float]:
    with (run_dir / "train_log.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def _train(config: str, overrides: list[str], capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    code = train_cli.main(["--config", str(CONFIGS / config), *overrides, *QUIET])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _eval(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    code = eval_cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.fixture(scope="module")
def cirr_runs(world: dict[str, Path]) -> dict[str, object]:
    """Stage 1 then stage 2 on tiny CIRR with the full data in one batch, so each step sees the same loss."""
    out = world["base"] / "cirr_run"
    common = [
        f"data.root={world['cirr']}",
        f"model.clip.name={world['clip']}",
        f"trainer.output_dir={out}",
        "trainer.log_every=1",
        "trainer.schedule=constant",
        *QUIET,
    ]
    stage1 = [
        "stage=1",
        "stage1.batch_size=10",
        "stage1.lr=0.0005",
        "stage1.epochs=8",
        "stage1.eval_every=4",
    ]
    stage2 = [
        "stage=2",
        "stage2.batch_size=10",
        "stage2.lr=0.001",
        "stage2.epochs=8",
        "stage2.eval_every=8",
        "model.combiner.dropout=0.0",
    ]
    results = {}
    for name, extra in (("stage1", stage1), ("stage2", stage2)):
        code = train_cli.main(["--config", str(CONFIGS / "cirr_combiner.yaml"), *common, *extra])
        assert code == 0
        results[name] = json.loads((out / name / "best" / "checkpoint.json").read_text())
    return {"out": out, "sidecars": results}


def test_both_stages_lower_the_loss(cirr_runs):
    out = cirr_runs["out"]
    for stage in ("stage1", "stage2"):
        losses = _losses(out / stage)
        assert len(losses) == 8
        assert losses[-1] < losses[0] * 0.9, (stage, losses)
    sidecar = cirr_runs["sidecars"]["stage2"]
    assert sidecar["config"]["task"]["stage"] == 2
    assert "r5_rs1_mean" in sidecar["metrics"]
    # stage 2 reused stage 1's cached image features (text tower tuned, image tower frozen)
    assert len(list((out / "feature_cache").glob("image-*.safetensors"))) == 2  # train triplets, val gallery


def test_stage2_starts_from_stage1_weights(cirr_runs):
    from capret.engine.checkpoint import load_model_weights
    from capret.inference.cir.combiner import load_cir_model
    from capret.models.clip import load_clip

    out = cirr_runs["out"]
    clip, fuser, config = load_cir_model(out / "stage2" / "best")
    assert config.stage == 2 and type(fuser).__name__ == "Combiner"
    stage1 = load_model_weights(load_clip(config.model.clip.name), out / "stage1" / "best")
    pretrained = load_clip(config.model.clip.name)
    key = "model.text_projection.weight"
    torch.testing.assert_close(clip.state_dict()[key], stage1.state_dict()[key])
    assert not torch.equal(clip.state_dict()[key], pretrained.state_dict()[key])
    # the exported folder (<run>/stage2/model, kind combiner) holds the same model, stage-1 CLIP included
    assert folder_kind(out / "stage2" / "model") == "combiner"
    assert (out / "stage2" / "model" / "clip.safetensors").is_file()
    exported = capret.load(out / "stage2", device="cpu")
    assert exported.stage == 2 and exported.config.model.clip == config.model.clip
    assert exported.config.model.stage1_checkpoint is None  # the folder carries the CLIP, not a path to it
    for a, b in ((exported.clip, clip), (exported.fuser, fuser)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(x, y, msg=name)


def test_sidecar_of_the_flat_pre_sections_config_still_loads(cirr_runs, tmp_path):
    """Checkpoints written when the combiner config was flat (``root``, ``clip``, ...) load to the same model."""
    from capret.inference.cir.combiner import load_cir_model

    best = cirr_runs["out"] / "stage2" / "best"
    old = tmp_path / "old_best"
    shutil.copytree(best, old)
    sidecar = json.loads((old / "checkpoint.json").read_text())
    task = sidecar["config"]["task"]
    data, model = task.pop("data"), task.pop("model")
    task.pop("loss")
    clip = model.pop("clip")
    task.update(
        dataset=data["dataset"],
        root=data["root"],
        categories=data["categories"],
        train_split=data["train_split"],
        val_split=data["val_split"],
        feature_cache=data["feature_cache"],
        eval_batch_size=data["encode_batch_size"],
        clip=clip["name"],
        preprocess=clip["preprocess"],
        target_ratio=clip["target_ratio"],
        **model,
    )
    (old / "checkpoint.json").write_text(json.dumps(sidecar))
    clip_new, fuser_new, config_new = load_cir_model(best)
    clip_old, fuser_old, config_old = load_cir_model(old)
    assert config_old == config_new
    for a, b in ((clip_old, clip_new), (fuser_old, fuser_new)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(x, y, msg=name)


def test_flat_keys_are_rejected_with_the_sections(world, tmp_path, capsys):
    argv = ["--config", str(CONFIGS / "fashioniq_combiner.yaml"), "root=fashion-iq", "--print-config"]
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "root" in err and "data" in err and "model" in err


def test_cirr_eval_cli_metrics_and_server_files(cirr_runs, world, tmp_path, capsys):
    ckpt = cirr_runs["out"] / "stage2" / "best"
    base = ["--dataset", "cirr", "--checkpoint", str(ckpt), "--root", str(world["cirr"]), "--device", "cpu"]
    val = _eval([*base, "--split", "val", "--out", str(tmp_path / "val")], capsys)
    trained = cirr_runs["sidecars"]["stage2"]["metrics"]
    for key in ("recall@1", "recall@5", "recall@50", "recall_subset@1", "r5_rs1_mean"):
        assert val["metrics"][key] == pytest.approx(trained[key])
    assert json.loads((tmp_path / "val" / "metrics.json").read_text())["metrics"] == val["metrics"]

    test = _eval([*base, "--split", "test", "--out", str(tmp_path / "test")], capsys)
    assert test["metrics"] == {}
    recall = json.loads((tmp_path / "test" / "cirr_recall_test1.json").read_text())
    subset = json.loads((tmp_path / "test" / "cirr_recall_subset_test1.json").read_text())
    annotations = json.loads((world["cirr"] / "cirr" / "captions" / "cap.rc2.test1.json").read_text())
    assert recall["version"] == "rc2" and recall["metric"] == "recall"
    assert subset["metric"] == "recall_subset"
    for record in annotations:
        ranking = recall[str(record["pairid"])]
        assert len(ranking) == 50 and record["reference"] not in ranking
        members = set(record["img_set"]["members"]) - {record["reference"]}
        top3 = subset[str(record["pairid"])]
        assert len(top3) == 3 and set(top3) <= members
        # the subset ranking follows the order of the full ranking
        in_full = [name for name in ranking if name in members]
        assert top3 == (in_full + [m for m in top3 if m not in in_full])[:3]


def test_circo_eval_with_gallery_from_image_folder(cirr_runs, world, tmp_path, capsys):
    root, ids = write_circo(tmp_path / "circo")
    ckpt = cirr_runs["out"] / "stage2" / "best"
    base = ["--dataset", "circo", "--checkpoint", str(ckpt), "--root", str(root), "--device", "cpu"]
    val = _eval([*base, "--split", "val", "--out", str(tmp_path / "val")], capsys)
    assert set(val["metrics"]) == {f"{m}@{k}" for m in ("map", "recall") for k in (5, 10, 25, 50)}
    assert all(0.0 <= v <= 1.0 for v in val["metrics"].values())
    _eval([*base, "--split", "test", "--out", str(tmp_path / "test")], capsys)
    submission = json.loads((tmp_path / "test" / "circo_test.json").read_text())
    assert sorted(submission, key=int) == [str(i) for i in range(6)]
    assert all(len(v) == 50 and set(v) <= set(ids) for v in submission.values())


def test_fashioniq_stage1_both_towers_and_eval(world, tmp_path, capsys):
    """Stage 1 with a trainable image tower reads pixels; eval on val equals the trainer's validation."""
    out = tmp_path / "fiq_run"
    summary = _train(
        "fashioniq_combiner.yaml",
        [
            f"data.root={world['fiq']}",
            f"model.clip.name={world['clip']}",
            "data.categories=[dress,shirt]",
            f"trainer.output_dir={out}",
            "stage=1",
            "model.encoder=both",
            "stage1.batch_size=4",
            "stage1.lr=0.0001",
            "stage1.epochs=1",
            "data.feature_cache=null",
        ],
        capsys,
    )
    assert summary["steps"] == 4  # 16 triplets / 4
    from capret.engine.checkpoint import load_model_weights
    from capret.models.clip import load_clip

    pretrained = load_clip(world["clip"])
    tuned = load_model_weights(load_clip(world["clip"]), out / "stage1" / "best")
    key = "model.visual_projection.weight"
    assert not torch.equal(tuned.state_dict()[key], pretrained.state_dict()[key])
    state = json.loads((out / "stage1" / "best" / "checkpoint.json").read_text())
    base = ["--dataset", "fashioniq", "--checkpoint", str(out / "stage1"), "--root", str(world["fiq"])]
    val = _eval([*base, "--split", "val", "--category", "dress", "--out", str(tmp_path / "eval")], capsys)
    assert val["stage"] == 1
    for key in ("dress/recall@10", "dress/recall@50"):
        assert val["metrics"][key] == pytest.approx(state["metrics"][key])
    test = _eval([*base, "--split", "test", "--category", "shirt", "--out", str(tmp_path / "test")], capsys)
    rankings = json.loads(Path(test["files"][0]).read_text())
    assert len(rankings) == 8 and all(len(r) == 50 for r in rankings.values())


def test_stage2_batches_come_from_the_cache_without_images(world, tmp_path):
    root = write_fashioniq(tmp_path / "fiq", categories=("dress",), n=8, extra=2)
    config = load_config(
        CombinerTaskConfig,
        CONFIGS / "fashioniq_combiner.yaml",
        [
            f"data.root={root}",
            f"model.clip.name={world['clip']}",
            "data.categories=[dress]",
            f"trainer.output_dir={tmp_path / 'run'}",
            "stage=2",
            "model.stage1_checkpoint=null",
            "stage2.batch_size=4",
            "trainer.num_workers=0",
        ],
    )
    task = CombinerTask(config)
    model = task.build_model()
    first = list(task.train_dataloader(rank=0, world_size=1, epoch=0, seed=0))
    shutil.rmtree(root / "images")  # every later epoch must run from the feature cache alone
    again = list(task.train_dataloader(rank=0, world_size=1, epoch=0, seed=0))
    later = list(task.train_dataloader(rank=0, world_size=1, epoch=1, seed=0))
    assert len(first) == len(later) == 2
    for a, b in zip(first, again):
        for key in ("reference", "text", "target"):
            torch.testing.assert_close(a[key], b[key])
    assert not torch.equal(first[0]["target"], later[0]["target"])  # reshuffled per epoch
    losses = task.training_step(model, first[0])
    assert set(losses) == {"loss"} and losses["loss"].requires_grad
    # two processes split the same epoch into disjoint halves
    halves = [task.epoch_batches(rank=r, world_size=2, epoch=0, seed=0)[0] for r in (0, 1)]
    assert not set(sum(halves[0], [])) & set(sum(halves[1], []))


def test_monitor_and_stage_are_checked(world, tmp_path, capsys):
    argv = [
        "--config",
        str(CONFIGS / "cirr_combiner.yaml"),
        f"data.root={world['cirr']}",
        f"model.clip.name={world['clip']}",
    ]
    assert train_cli.main([*argv, "trainer.monitor=map", f"trainer.output_dir={tmp_path}"]) == 2
    assert "valid: recall@1" in capsys.readouterr().err
    assert train_cli.main([*argv, "stage=3", f"trainer.output_dir={tmp_path}"]) == 2
    assert "choose 1 or 2" in capsys.readouterr().err


def test_datasets_and_fusers_come_from_the_registries(world, tmp_path, monkeypatch):
    """The task builds its readers with ``create_dataset`` and its fuser with ``create_combiner``."""
    from capret import data
    from capret.models import combiner as combiner_module
    from capret.tasks.combiner import build_fuser

    calls: list[tuple[str, dict]] = []
    for family, name in ((data._DATASETS, "cirr"), (combiner_module._COMBINERS, "combiner")):
        real = family.get(name)

        def spy(*, _real=real, _name=name, **kwargs):
            calls.append((_name, kwargs))
            return _real(**kwargs)

        monkeypatch.setitem(family._entries, name, spy)
    argv = [f"data.root={world['cirr']}", f"model.clip.name={world['clip']}", "stage=2"]
    config = load_config(
        CombinerTaskConfig, CONFIGS / "cirr_combiner.yaml", [*argv, "model.combiner.dropout=0.1"]
    )
    CombinerTask(config)
    assert calls == [("cirr", {"root": str(world["cirr"]), "split": "train"})]
    fuser = build_fuser(config, 8)
    assert calls[1][0] == "combiner" and calls[1][1]["dropout"] == 0.1
    assert type(fuser).__name__ == "Combiner"


def test_combiner_on_an_open_clip_backbone(world, tmp_path, capsys):
    """The RN50x4 config's path: an open_clip ModifiedResNet CLIP through both stages and capret-eval."""
    from tiny_zeroshot import tiny_open_clip

    name = tiny_open_clip(tmp_path / "rn", image_tower="rn")
    out = tmp_path / "oc_run"
    common = [
        f"data.root={world['cirr']}",
        "model.clip.backend=open_clip",
        f"model.clip.name={name}",
        "model.clip.pretrained=null",
        f"trainer.output_dir={out}",
        "model.combiner.projection_dim=32",
        "model.combiner.hidden_dim=64",
    ]
    _train(
        "cirr_combiner_rn50x4.yaml", [*common, "stage=1", "stage1.batch_size=10", "stage1.epochs=1"], capsys
    )
    summary = _train(
        "cirr_combiner_rn50x4.yaml", [*common, "stage=2", "stage2.batch_size=10", "stage2.epochs=2"], capsys
    )
    assert summary["steps"] == 2
    base = ["--dataset", "cirr", "--checkpoint", str(out / "stage2"), "--root", str(world["cirr"])]
    val = _eval([*base, "--split", "val", "--out", str(tmp_path / "eval")], capsys)
    assert {k: val["clip"][k] for k in ("backend", "name", "pretrained")} == {
        "backend": "open_clip",
        "name": name,
        "pretrained": None,
    }
    assert val["stage"] == 2 and 0.0 <= val["metrics"]["recall@50"] <= 1.0
