"""An unreadable image in a CIR dataset: feature extraction, Combiner training and ``capret-eval cir`` name it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from repo_paths import CONFIGS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_cir import make_tiny_clip, write_cirr  # noqa: E402

from capret.cli import train as train_cli  # noqa: E402
from capret.data.cirr import CIRR  # noqa: E402
from capret.errors import BadImageError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.amp='off'", "trainer.num_workers=0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("badcir")
    root = write_cirr(base / "cirr", n=4)
    reference = CIRR(root, "train").triplets[0].reference
    path = CIRR(root, "train").image_path(reference)
    path.write_bytes(path.read_bytes()[:60])  # truncated: the header parses, the pixels do not
    return {"base": base, "clip": make_tiny_clip(base / "clip"), "cirr": root, "bad": path}


def test_image_features_name_the_unreadable_file(world: dict[str, Path]) -> None:
    from capret.inference.cir.features import image_features
    from capret.models.clip import load_clip

    clip = load_clip(str(world["clip"]))
    ds = CIRR(world["cirr"], "train")
    names = [t.reference for t in ds.triplets]
    with pytest.raises(BadImageError, match=world["bad"].name) as info:
        image_features(clip, names, load_image=ds.load_image, batch_size=2)
    assert info.value.path == world["bad"]


@pytest.mark.parametrize("stage", [1, 2])
def test_combiner_training_stops_with_one_line(
    world: dict[str, Path], stage: int, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", str(CONFIGS / "cirr_combiner.yaml"), f"data.root={world['cirr']}",
            f"model.clip.name={world['clip']}", f"trainer.output_dir={world['base'] / 'run'}", f"stage={stage}",
            f"stage{stage}.epochs=1", f"stage{stage}.batch_size=4", "model.stage1_checkpoint=null", *QUIET]  # fmt: skip
    capsys.readouterr()
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(world["bad"]) in lines[0], err


def test_skip_policy_drops_the_triplets_and_lists_the_file(
    tmp_path: Path, world: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``data.on_bad_image=skip``: training goes on without the triplets of the unreadable image (validation
    reads its own, intact copy of the images here), and the file is listed with the count."""
    import json
    import shutil

    root = tmp_path / "cirr"
    shutil.copytree(world["cirr"], root)
    fresh = write_cirr(tmp_path / "fresh", n=4)  # intact images for the validation split
    shutil.copytree(fresh / "dev", root / "devval")
    split = root / "cirr" / "image_splits" / "split.rc2.val.json"
    split.write_text(
        json.dumps({k: v.replace("./dev/", "./devval/") for k, v in json.loads(split.read_text()).items()})
    )
    bad = root / "dev" / world["bad"].name
    total = len(CIRR(root, "train").triplets)
    dropped = sum(bad.stem in (t.reference, t.target) for t in CIRR(root, "train").triplets)
    out = tmp_path / "run"
    argv = ["--config", str(CONFIGS / "cirr_combiner.yaml"), f"data.root={root}", f"model.clip.name={world['clip']}",
            f"trainer.output_dir={out}", "stage=2", "stage2.epochs=1", "stage2.batch_size=2",
            "model.stage1_checkpoint=null", "data.on_bad_image=skip", *QUIET]  # fmt: skip
    capsys.readouterr()
    code = train_cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["bad_images"] == 1
    listed = json.loads((out / "bad_images.json").read_text())
    assert listed["count"] == 1 and listed["files"][0]["file"] == str(bad)
    assert listed["dropped_triplets"] == dropped >= 1 and dropped < total
    argv[argv.index("data.on_bad_image=skip")] = "data.on_bad_image=sometimes"
    assert train_cli.main(argv) == 2
    assert "on_bad_image" in capsys.readouterr().err


def test_cir_eval_names_an_unreadable_gallery_image(
    tmp_path: Path, world: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from capret.cli import eval as eval_cli

    fresh = write_cirr(tmp_path / "fresh", n=4)  # a checkpoint trained on intact images
    out = tmp_path / "run"
    argv = ["--config", str(CONFIGS / "cirr_combiner.yaml"), f"data.root={fresh}", f"model.clip.name={world['clip']}",
            f"trainer.output_dir={out}", "stage=2", "stage2.epochs=1", "stage2.batch_size=4",
            "model.stage1_checkpoint=null", *QUIET]  # fmt: skip
    assert train_cli.main(argv) == 0
    capsys.readouterr()
    code = eval_cli.main(["--dataset", "cirr", "--checkpoint", str(out / "stage2" / "best"), "--root",
                          str(world["cirr"]), "--out", str(tmp_path / "eval"), "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(world["bad"]) in lines[0] and "cannot decode" in lines[0], err
