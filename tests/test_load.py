"""``capret.load``: one loader for every task's model folder, its ``kind``, and folders written before ``kind``.

Tiny random CLIPs and mappers (built from configs, no download); the end-to-end exports of each task are
checked in the task tests (``tests/tasks``), which call ``capret.load`` on what ``capret-train`` wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_cir import make_tiny_clip

import capret
from capret.api import load_cir_model, load_model
from capret.config import to_dict
from capret.errors import CheckpointError
from capret.inference.cir.combiner import CombinerModel, save_combiner_folder
from capret.inference.cir.inversion import ZeroShotModel, save_mapper_folder
from capret.inference.model_kinds import list_model_kinds
from capret.models.clip import TaskClipConfig, load_task_clip_config
from capret.models.combiner import CombinerModelConfig, CombinerRecord, build_fuser
from capret.models.folder import MODEL_CONFIG_FILE, ModelFolderError, folder_kind
from capret.models.zeroshot import MapperRecord, build_mapper
from capret.tasks.registry import list_tasks


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key].cpu(), sb[key].cpu(), rtol=0, atol=0, msg=key)


def test_every_training_task_exports_a_kind_that_load_opens() -> None:
    """Each ``capret-train`` task's name is a kind :func:`capret.load` has a loader for (ablation excepted: it
    runs other tasks)."""
    kinds = set(list_model_kinds())
    missing = [task for task in list_tasks() if task not in kinds]
    assert not missing, f"tasks without a capret.load kind: {missing}"


def test_kind_is_inferred_for_folders_written_before_it(tmp_path: Path) -> None:
    cases = {
        "dual": (MODEL_CONFIG_FILE, {"format": "capret.dual_stream/1", "config": {}}, "dualstream"),
        "det": ("capret_detector.json", {"format": "capret.detector/1", "config": {}}, "detector"),
        "phi_ckpt": ("checkpoint.json", {"config": {"task": {"task": "phi"}}}, "phi"),
        "combiner_ckpt": (
            "checkpoint.json",
            {"config": {"task": {"task": "combiner", "stage": 2}}},
            "combiner",
        ),
        "dual_ckpt": (
            "checkpoint.json",
            {"config": {"task": {"model": {"visual": {}, "text": {}}}}},
            "dualstream",
        ),
        "new": (
            MODEL_CONFIG_FILE,
            {"kind": "pic2word", "format": "capret.mapper/1", "config": {}},
            "pic2word",
        ),
    }
    for name, (file, data, kind) in cases.items():
        _write(tmp_path / name / file, data)
        assert folder_kind(tmp_path / name) == kind, name


def test_folders_that_say_no_kind_fail_naming_the_file(tmp_path: Path) -> None:
    _write(tmp_path / "odd" / MODEL_CONFIG_FILE, {"format": "someone.else/3"})
    with pytest.raises(ModelFolderError, match="someone.else/3"):
        folder_kind(tmp_path / "odd")
    _write(tmp_path / "bare" / "checkpoint.json", {"config": {"trainer": {}}})
    with pytest.raises(ModelFolderError, match="config.task.task"):
        folder_kind(tmp_path / "bare")
    _write(tmp_path / "unknown" / MODEL_CONFIG_FILE, {"kind": "teleporter", "format": "x/1", "config": {}})
    with pytest.raises(ModelFolderError, match="teleporter.*known kinds: .*combiner"):
        capret.load(tmp_path / "unknown")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="not a capret model folder"):
        folder_kind(tmp_path / "empty")


def _mapper_folder(
    clip_dir: Path, folder: Path, *, kind: str = "phi"
) -> tuple[torch.nn.Module, MapperRecord]:
    clip = load_task_clip_config(TaskClipConfig(name=str(clip_dir)))
    torch.manual_seed(1)
    hparams = {
        "input_dim": clip.feature_dim,
        "hidden_dim": 16,
        "output_dim": clip.token_width,
        "dropout": 0.5,
    }
    mapper = build_mapper("phi", hparams)
    record = MapperRecord(
        clip=TaskClipConfig(name=str(clip_dir)),
        method="searle",
        mapper="phi",
        hparams=hparams,
        placeholder="$",
    )
    save_mapper_folder(folder, kind=kind, mapper=mapper, record=record, trained_from={"task": kind})
    return mapper, record


def test_mapper_folder_round_trip_and_kind_check(clip_dir: Path, tmp_path: Path) -> None:
    mapper, record = _mapper_folder(clip_dir, tmp_path / "run" / "model")
    meta = json.loads((tmp_path / "run" / "model" / MODEL_CONFIG_FILE).read_text())
    assert (
        meta["kind"] == "phi"
        and meta["config"]["mapper"] == "phi"
        and meta["trained_from"] == {"task": "phi"}
    )
    model = capret.load(tmp_path / "run", device="cpu")  # a run folder resolves to its model/
    assert isinstance(model, ZeroShotModel) and model.record == record and model.method == "searle"
    _state_equal(model.mapper, mapper)
    feats = torch.randn(3, model.clip.feature_dim)
    torch.testing.assert_close(model.mapper(feats), mapper.eval()(feats))
    with pytest.raises(ModelFolderError, match="'phi' model, not the 'dualstream'"):
        load_model(tmp_path / "run")  # the dual-stream loader refuses a mapper folder, naming both kinds


def test_combiner_folder_holds_its_fine_tuned_clip(clip_dir: Path, tmp_path: Path) -> None:
    """A stage-2 folder started from stage 1 carries the stage-1 CLIP weights: it needs no run folder beside it."""
    config = CombinerRecord(stage=2, model=CombinerModelConfig(clip=TaskClipConfig(name=str(clip_dir))))
    clip = load_task_clip_config(config.model.clip)
    with torch.no_grad():  # stands in for stage-1 fine-tuning
        clip.model.text_projection.weight.add_(0.5)
    torch.manual_seed(2)
    fuser = build_fuser(config, clip.feature_dim)
    save_combiner_folder(tmp_path / "m", clip=clip, fuser=fuser, config=config, clip_trained=True)
    loaded = capret.load(tmp_path / "m", device="cpu")
    assert isinstance(loaded, CombinerModel) and loaded.stage == 2
    assert to_dict(loaded.config) == to_dict(config)
    _state_equal(loaded.clip, clip)
    _state_equal(loaded.fuser, fuser)
    clip2, fuser2, record = load_cir_model(tmp_path / "m")  # the old loader, same model
    _state_equal(fuser2, fuser)
    assert record.stage == 2 and (tmp_path / "m" / "clip.safetensors").is_file()
    with pytest.raises(ModelFolderError, match="'combiner' model, not the 'detector'"):
        capret.load(tmp_path / "m", kind="detector")


def test_a_folder_missing_its_weights_fails_naming_the_file(clip_dir: Path, tmp_path: Path) -> None:
    config = CombinerRecord(stage=2, model=CombinerModelConfig(clip=TaskClipConfig(name=str(clip_dir))))
    clip = load_task_clip_config(config.model.clip)
    save_combiner_folder(
        tmp_path / "m",
        clip=clip,
        fuser=build_fuser(config, clip.feature_dim),
        config=config,
        clip_trained=False,
    )
    (tmp_path / "m" / "fuser.safetensors").unlink()
    with pytest.raises(CheckpointError, match="fuser.safetensors"):
        capret.load(tmp_path / "m")
