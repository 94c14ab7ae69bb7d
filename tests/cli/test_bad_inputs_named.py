"""Every error names its file: a full disk says "disk full" with the path, YAML with ``!!python`` tags and
non-UTF-8 or broken JSON name the file, and a refused run leaves nothing behind (no 0-byte caption store).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli_checks import expect_error  # noqa: E402
from tiny_text import save_tiny_dual_stream  # noqa: E402
from tiny_vlm import write_deepfashion2  # noqa: E402

from capret.cli import extract as extract_cli  # noqa: E402
from capret.cli import main as capret_cli  # noqa: E402
from captioning import cli as caption_cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _disk_full(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_dual_stream(tmp_path_factory.mktemp("model") / "model", pad="squarepad")


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shop")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, size=(30, 36, 3), dtype=np.uint8)).save(
            folder / f"{i + 1:06d}.png"
        )
    return folder


def test_full_disk_during_extraction_says_disk_full_with_the_path(
    tmp_path: Path,
    model_dir: Path,
    shop: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "feats"
    monkeypatch.setattr(np, "save", _disk_full)
    line = expect_error(capsys, extract_cli.main, ["--checkpoint", str(model_dir), "--images", str(shop), "--out",
                                                   str(out)], "disk full", "features_r0_00000")  # fmt: skip
    assert str(out) in line
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]  # nothing half-written is left


def test_full_disk_during_gallery_build_names_the_shard(
    tmp_path: Path,
    model_dir: Path,
    shop: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(np, "save", _disk_full)
    argv = ["index", "build", "--checkpoint", str(model_dir), "--images", str(shop), "--out",
            str(tmp_path / "g"), "--no-progress"]  # fmt: skip
    expect_error(capsys, capret_cli.main, argv, "disk full", "features_r0_00000.npy")
    assert not list((tmp_path / "g" / "features").glob("*.npy"))


def test_full_disk_during_captioning_says_disk_full_and_leaves_no_empty_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import captioning.store

    root = tmp_path / "df2"
    write_deepfashion2(root, "validation", images=2, items_per_image=1)
    out = tmp_path / "captions.jsonl"
    argv = ["--dataset", "deepfashion2", "--root", str(root), "--split", "validation", "--backend", "template",
            "--out", str(out), "--no-progress"]  # fmt: skip
    pwrite = os.pwrite

    def full_for_captions(fd: int, data: bytes, offset: int) -> int:
        if b'"caption"' in bytes(data):  # the store's records; lock files and others still write
            _disk_full()
        return pwrite(fd, data, offset)

    monkeypatch.setattr(captioning.store.os, "pwrite", full_for_captions)
    expect_error(capsys, caption_cli.main, argv, "disk full", "captions.jsonl")
    assert not out.exists()  # the refused run left no 0-byte store
    monkeypatch.undo()
    capsys.readouterr()
    assert caption_cli.main(argv) == 0 and out.stat().st_size > 0


def test_refused_caption_run_leaves_no_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "captions.jsonl"
    argv = ["--dataset", "deepfashion2", "--root", str(tmp_path / "missing"), "--split", "validation",
            "--backend", "template", "--out", str(out), "--no-progress"]  # fmt: skip
    assert caption_cli.main(argv) == 2
    assert not out.exists()


def test_python_yaml_tags_are_refused_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from capret.config import ConfigError
    from captioning.prompts import load_prompt_set

    evil = "version: x\n!!python/object/apply:os.system ['touch pwned']: 1\n"
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(evil)
    with pytest.raises(ConfigError, match=r"prompts.yaml.*python"):
        load_prompt_set(prompts)
    variants = tmp_path / "variants.yaml"
    variants.write_text("variants: !!python/object/apply:os.system ['touch pwned']\n")
    config = tmp_path / "c.yaml"
    config.write_text("task: dualstream\n")
    argv = ["ablate", "--config", str(config), "--variants", str(variants), "--out", str(tmp_path / "o")]
    expect_error(capsys, capret_cli.main, argv, "variants.yaml", "python")
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_non_utf8_and_broken_json_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from capret.errors import DataError
    from capret.inference.cir.concepts import load_concepts

    concepts = tmp_path / "concepts.txt"
    concepts.write_bytes(b"red\nbl\xe9u\n")
    with pytest.raises(DataError, match=r"concepts.txt.*not UTF-8"):
        load_concepts(concepts)
    as_json = tmp_path / "concepts.json"
    as_json.write_text('["red", "blue",]')
    with pytest.raises(DataError, match=r"concepts.json.*line 1, column"):
        load_concepts(as_json)
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "pipeline.json").write_bytes(b'{"model": "caf\xe9"}')
    argv = ["search", "--pipeline", str(folder), "--gallery-id", "a/0"]
    expect_error(capsys, capret_cli.main, argv, "pipeline.json", "not UTF-8")
    (folder / "pipeline.json").write_text('{"model": "m",\n "gallery": }')
    expect_error(capsys, capret_cli.main, argv, "pipeline.json", "line 2, column")
    (folder / "pipeline.json").write_text(json.dumps({"model": "m"}))
