"""Bad input to the query and CIR console paths (search, index build, serve, ablate, oti, CIR and detected-protocol
eval).

Same contract as ``test_bad_inputs.py``: ``main(argv)`` exits 2 with one ``error:`` line naming the file, field or
value, and prints no traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli_checks import expect_error  # noqa: E402
from tiny_text import save_tiny_dual_stream, write_synthetic_df2  # noqa: E402

from capret.cli import eval as eval_cli  # noqa: E402
from capret.cli import main as capret_cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:

    root = tmp_path_factory.mktemp("model")
    save_tiny_dual_stream(root / "model", pad="squarepad")
    return root / "model"


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shop")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, size=(30, 36, 3), dtype=np.uint8)).save(
            folder / f"{i + 1:06d}.png"
        )
    return folder


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, shop: Path) -> Path:
    from capret.inference.query.pipeline import PipelineConfig

    root = tmp_path_factory.mktemp("pipe")
    argv = [
        "index",
        "build",
        "--checkpoint",
        str(model_dir),
        "--images",
        str(shop),
        "--out",
        str(root / "gallery"),
    ]
    assert capret_cli.main([*argv, "--no-progress"]) == 0
    PipelineConfig(model=str(model_dir), gallery="../gallery", captioner=None).save(root / "pipeline")
    return root / "pipeline"


def test_search_bad_inputs(
    tmp_path: Path, pipeline_dir: Path, shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = shop / "000001.png"
    expect_error(capsys, capret_cli.main, ["search", "--pipeline", str(tmp_path / "nope"), "--image", str(photo)],
                 "nope")  # fmt: skip
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pipeline.json").write_text("{not json")
    expect_error(capsys, capret_cli.main, ["search", "--pipeline", str(broken), "--image", str(photo)],
                 "pipeline.json", "JSON")  # fmt: skip
    argv = ["search", "--pipeline", str(pipeline_dir)]
    assert capret_cli.main([*argv, "--image", str(photo), "--json"]) == 0
    expect_error(capsys, capret_cli.main, [*argv, "--image", str(tmp_path / "gone.jpg")], "gone.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(photo.read_bytes()[:40])
    expect_error(capsys, capret_cli.main, [*argv, "--image", str(bad)], "bad.jpg", "cannot decode image")
    expect_error(capsys, capret_cli.main, [*argv, "--gallery-id", "999999/0"], "999999/0")


def test_index_build_bad_inputs(
    tmp_path: Path, model_dir: Path, shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def build(images: Path, checkpoint: Path, out: str) -> list[str]:
        return ["index", "build", "--checkpoint", str(checkpoint), "--images", str(images),
                "--out", str(tmp_path / out), "--no-progress"]  # fmt: skip

    expect_error(capsys, capret_cli.main, build(tmp_path / "noimages", model_dir, "g1"), "noimages")
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in shop.iterdir():
        (photos / p.name).write_bytes(p.read_bytes())
    (photos / "000009.png").write_bytes((shop / "000001.png").read_bytes()[:50])  # truncated
    expect_error(capsys, capret_cli.main, build(photos, model_dir, "g2"), "000009.png")
    expect_error(capsys, capret_cli.main, build(shop, tmp_path / "nomodel", "g3"), "nomodel")


def test_serve_missing_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import capret.serve

    started: list[object] = []
    monkeypatch.setattr(capret.serve, "serve", lambda *a, **k: started.append(a))
    expect_error(capsys, capret_cli.main, ["serve", "--pipeline", str(tmp_path / "nopipe")], "nopipe")
    assert not started


def test_ablate_bad_inputs(tmp_path: Path, configs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = configs_dir / "ablation_demo.yaml"
    if not config.is_file():
        config = next(configs_dir.glob("*dual*.yaml"))
    argv = ["ablate", "--config", str(config), "--out", str(tmp_path / "out"), "--seeds", "1"]
    expect_error(
        capsys, capret_cli.main, [*argv, "--variants", str(tmp_path / "novariants.yaml")], "novariants.yaml"
    )
    variants = configs_dir / "ablation_demo_variants.yaml"
    expect_error(capsys, capret_cli.main, [*argv, "--variants", str(variants), "--only", "nosuchvariant"],
                 "nosuchvariant")  # fmt: skip


def test_oti_missing_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tiny_cir import make_tiny_clip

    clip = make_tiny_clip(tmp_path / "clip")
    expect_error(capsys, capret_cli.main, ["oti", "--clip", str(clip), "--images", str(tmp_path / "noimgs"),
                                           "--out", str(tmp_path / "o")], "noimgs")  # fmt: skip


def test_eval_cirr_missing_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_error(capsys, eval_cli.main, ["--dataset", "cirr", "--root", str(tmp_path / "nocirr"),
                                         "--checkpoint", str(tmp_path / "ck")], "nocirr")  # fmt: skip


def test_eval_detected_protocol_bad_detections(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "df2"
    write_synthetic_df2(root, identities={"train": 2, "validation": 2}, size=40)
    dets = tmp_path / "dets.json"
    argv = ["--protocol", "deepfashion2", "--checkpoint", str(model_dir), "--root", str(root), "--split",
            "validation", "--detections", str(dets), "--out", str(tmp_path / "out")]  # fmt: skip
    dets.write_text(json.dumps({"image_id": 1}))
    expect_error(capsys, eval_cli.main, argv, "dets.json", "list")
    dets.write_text(json.dumps([{"image_id": 1, "category_id": 1, "score": 0.9}]))
    expect_error(capsys, eval_cli.main, argv, "dets.json", "entry 0", "bbox")
    dets.write_text(
        json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": float("nan")}])
    )
    expect_error(capsys, eval_cli.main, argv, "dets.json", "entry 0", "non-finite")


def test_index_build_refuses_a_folder_of_another_model(
    tmp_path: Path, model_dir: Path, shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from capret.inference.query.gallery import Gallery

    other = tmp_path / "other_model"
    shutil.copytree(model_dir, other)  # same architecture and width: only the recorded model differs
    out = tmp_path / "gallery"

    def build(checkpoint: Path, *extra: str) -> list[str]:
        return ["index", "build", "--checkpoint", str(checkpoint), "--images", str(shop), "--out", str(out),
                "--no-progress", *extra]  # fmt: skip

    assert capret_cli.main(build(model_dir)) == 0
    line = expect_error(
        capsys, capret_cli.main, build(other), str(out), "another build", "--overwrite", "other_model"
    )
    assert line.startswith("error:")
    assert Gallery(out).settings["model"] == str(model_dir.resolve())  # the refused run changed nothing
    (out / "notes.txt").write_text("mine")
    assert capret_cli.main(build(other, "--overwrite")) == 0
    assert Gallery(out).settings["model"] == str(other.resolve()) and len(Gallery(out)) == 3
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes the gallery's own files only
    assert capret_cli.main(build(other)) == 0  # the same build again resumes (no refusal)
