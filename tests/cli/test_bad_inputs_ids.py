"""Ids are ids: gallery and extraction ids are names relative to a declared root, image paths are stored relative
to it (a copied folder tree keeps working), and symbolic links that leave the root are refused unless allowed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli_checks import expect_error  # noqa: E402
from tiny_text import save_tiny_dual_stream  # noqa: E402

from capret.cli import extract as extract_cli  # noqa: E402
from capret.cli import main as capret_cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_dual_stream(tmp_path_factory.mktemp("model") / "model", pad="squarepad")


def _photos(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(names))
    for name in names:
        Image.fromarray(rng.integers(0, 255, size=(30, 36, 3), dtype=np.uint8)).save(folder / name)
    return [folder / n for n in names]


def _items(gallery: Path) -> list[dict[str, object]]:
    return [json.loads(line) for p in sorted((gallery / "features").glob("items_*.jsonl"))
            for line in p.read_text().splitlines()]  # fmt: skip


def test_list_file_of_absolute_paths_gives_relative_ids_and_a_copyable_folder(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from capret.inference.query.pipeline import PipelineConfig

    project = tmp_path / "project"
    photos = _photos(project / "shop" / "tops", ["a.png", "b.png"]) + _photos(project / "shop", ["c.png"])
    listing = project / "shop.txt"
    listing.write_text("".join(f"{p.resolve()}\n" for p in photos))  # absolute paths, as users write them
    argv = ["index", "build", "--checkpoint", str(model_dir), "--images", str(listing), "--out",
            str(project / "gallery"), "--no-progress"]  # fmt: skip
    assert capret_cli.main(argv) == 0
    items = _items(project / "gallery")
    assert [i["id"] for i in items] == ["shop/tops/a.png/0", "shop/tops/b.png/0", "shop/c.png/0"]
    assert [i["image"] for i in items] == ["shop/tops/a.png", "shop/tops/b.png", "shop/c.png"]
    settings = json.loads((project / "gallery" / "gallery.json").read_text())
    assert settings["image_root"] == ".."
    PipelineConfig(model=str(model_dir), gallery="../gallery", captioner=None).save(project / "pipeline")

    copy = tmp_path / "elsewhere" / "project"
    shutil.copytree(project, copy)
    shutil.rmtree(project)  # the original is gone: the copy must stand on its own
    search = ["search", "--pipeline", str(copy / "pipeline"), "--json", "--k", "2"]
    capsys.readouterr()
    assert capret_cli.main([*search, "--gallery-id", "shop/c.png/0"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert {m["image"] for m in found["matches"]} <= {
        str(copy / "shop" / "tops" / n) for n in ("a.png", "b.png")
    }
    assert capret_cli.main([*search, "--image", str(copy / "shop" / "c.png")]) == 0
    top = json.loads(capsys.readouterr().out)["matches"][0]
    assert top["gallery_id"] == "shop/c.png/0" and top["image"] == str(copy / "shop" / "c.png")


def test_images_outside_the_root_are_refused_unless_declared(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = _photos(tmp_path / "data" / "shop", ["x.png"])[0]
    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "shop.txt"
    listing.write_text(f"{outside}\n")
    argv = ["--checkpoint", str(model_dir), "--images", str(listing), "--out", str(tmp_path / "f")]
    expect_error(capsys, extract_cli.main, argv, "shop.txt:1", "outside the image root", "--root")
    assert not (tmp_path / "f").exists()
    assert extract_cli.main([*argv, "--root", str(tmp_path / "data")]) == 0
    manifest = json.loads((tmp_path / "f" / "manifest_r0.json").read_text())
    ids = np.load(tmp_path / "f" / manifest["shards"][0]["ids"]).tolist()
    assert ids == ["shop/x.png"]


def test_symlinks_leaving_the_root_are_refused_unless_allowed(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = _photos(tmp_path / "private", ["secret.png"])[0]
    shop = tmp_path / "shop"
    _photos(shop, ["a.png"])
    (shop / "link.png").symlink_to(secret)
    argv = ["index", "build", "--checkpoint", str(model_dir), "--images", str(shop), "--out",
            str(tmp_path / "gallery"), "--no-progress"]  # fmt: skip
    expect_error(capsys, capret_cli.main, argv, "link.png", "symbolic link", "--follow-symlinks")
    assert not (tmp_path / "gallery" / "gallery.json").exists()
    assert capret_cli.main([*argv, "--follow-symlinks"]) == 0
    assert [i["id"] for i in _items(tmp_path / "gallery")] == ["a/0", "link/0"]
    inside = shop / "same.png"
    inside.symlink_to(shop / "a.png")  # a link that stays inside the root is fine without the option
    from capret.data.image_list import list_images
    from capret.errors import DataError

    with pytest.raises(DataError, match="link.png"):
        list_images(shop)
    assert list_images(shop, follow_symlinks=True).ids == ["a", "link", "same"]
    (shop / "link.png").unlink()
    assert list_images(shop).ids == ["a", "same"]


def test_library_refuses_absolute_ids(tmp_path: Path, model_dir: Path) -> None:
    from capret.errors import DataError
    from capret.inference.dualstream.encoding import load_model
    from capret.inference.query.gallery import build_gallery

    photo = _photos(tmp_path / "shop", ["a.png"])[0]
    with pytest.raises(DataError, match="names, not paths"):
        build_gallery(
            load_model(model_dir), images=[photo], ids=[str(photo)], out=tmp_path / "g", progress=False
        )


def test_oti_image_folder_refuses_links_leaving_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tiny_cir import make_tiny_clip

    from capret.data.image_sources import open_image_source
    from capret.errors import DataError

    secret = _photos(tmp_path / "private", ["secret.png"])[0]
    images = tmp_path / "images"
    _photos(images, ["a.png"])
    (images / "link.png").symlink_to(secret)
    clip = make_tiny_clip(tmp_path / "clip")
    out = tmp_path / "tokens.safetensors"
    argv = ["oti", "--clip", str(clip), "--images", str(images), "--out", str(out), "--steps", "1"]
    expect_error(capsys, capret_cli.main, argv, "link.png", "symbolic link", "--follow-symlinks")
    assert not out.exists()
    with pytest.raises(DataError, match="link.png"):
        open_image_source(images)
    assert open_image_source(images, follow_symlinks=True).keys == ["a.png", "link.png"]
