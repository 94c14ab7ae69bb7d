"""Integrity on read: every catalogue row stores its source photo's SHA-256, and each reader of the photo
(caption update, re-embed, the server's item image, doctor) checks it. One flipped byte after ``add`` is refused
naming the file and the row; ``--no-verify`` reads on with a warning; ``doctor`` lists the photo and exits 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tiny_pipeline import write_shop_photos
from tiny_text import save_tiny_dual_stream

from capret.catalogue import Catalogue, doctor, reembed
from capret.catalogue.table import SourceChangedError
from capret.cli.main import main
from capret.serve.catalogue import CatalogueBackend, create_catalogue_app

pytestmark = pytest.mark.usefixtures("one_thread")

ITEM = "tops/000001/0"
PHOTO = Path("tops") / "000001.png"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("integrity_models")
    first = save_tiny_dual_stream(root / "model_a", pad="squarepad", seed=0)
    second = save_tiny_dual_stream(root / "model_b", bert=root / "bert", pad="squarepad", seed=1)
    return {"a": first, "b": second}


@pytest.fixture
def catalogue_dir(tmp_path: Path, models: dict[str, Path]) -> Path:
    photos = tmp_path / "photos"
    write_shop_photos(photos / "tops", count=3)
    folder = tmp_path / "cat"
    assert main(["catalogue", "create", "--model", str(models["a"]), "--root", str(photos), str(folder)]) == 0
    argv = ["catalogue", "add", str(folder), str(photos / "tops"), "--category", "tops", "--no-progress"]
    assert main(argv) == 0
    return folder


def _flip_a_byte(path: Path) -> None:
    """Flip one bit of the PNG's last byte (the end chunk's CRC, which decoders skip): the file still decodes
    to the same pixels, only its SHA-256 tells it changed."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _json(text: str) -> dict:
    return json.loads(text) if text.strip().startswith("{") else {}


def test_changed_photo_refused_on_caption_update_naming_file_and_row(
    catalogue_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = catalogue_dir.parent / "photos" / PHOTO
    _flip_a_byte(photo)
    capsys.readouterr()
    code = main(["catalogue", "update", str(catalogue_dir), "--id", ITEM, "--caption", "a red top"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert str(photo) in err and repr(ITEM) in err and "changed since it was added" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    row = Catalogue.open(str(catalogue_dir)).rows([ITEM])[0]
    assert row["caption_source"] != "manual"  # nothing was written

    code = main(
        ["catalogue", "update", str(catalogue_dir), "--id", ITEM, "--caption", "a red top", "--no-verify"]
    )
    captured = capsys.readouterr()
    assert code == 0 and _json(captured.out)["caption_source"] == "manual"
    assert "warning: --no-verify" in captured.err


def test_changed_photo_stops_reembed_unless_no_verify(
    catalogue_dir: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    photo = catalogue_dir.parent / "photos" / PHOTO
    _flip_a_byte(photo)
    catalogue = Catalogue.open(str(catalogue_dir))
    with pytest.raises(SourceChangedError) as info:
        reembed(catalogue, model=models["b"])
    assert info.value.path == photo and ITEM in str(info.value)
    capsys.readouterr()
    argv = ["catalogue", "update", str(catalogue_dir), "--reembed", "--no-verify"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert _json(captured.out)["reembedded"] == 3 and "warning: --no-verify" in captured.err


def test_doctor_lists_the_changed_photo_and_exits_nonzero(
    catalogue_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = doctor(Catalogue.open(str(catalogue_dir)))
    assert before["changed_sources"] == [] and not any("changed since" in p for p in before["problems"])
    _flip_a_byte(catalogue_dir.parent / "photos" / PHOTO)
    capsys.readouterr()
    assert main(["catalogue", "doctor", str(catalogue_dir)]) == 1
    report = _json(capsys.readouterr().out)
    assert report["changed_sources"] == [{"image": PHOTO.as_posix(), "ids": [ITEM]}]
    assert any(PHOTO.as_posix() in p and ITEM in p for p in report["problems"])
    main(["catalogue", "doctor", str(catalogue_dir), "--no-verify"])
    captured = capsys.readouterr()
    skipped = _json(captured.out)
    assert skipped["changed_sources"] == [] and skipped["sources_verified"] is False
    assert "warning: --no-verify" in captured.err


def test_server_refuses_a_changed_item_photo_unless_verify_off(catalogue_dir: Path) -> None:
    _flip_a_byte(catalogue_dir.parent / "photos" / PHOTO)
    client = TestClient(create_catalogue_app(CatalogueBackend.open(str(catalogue_dir))))
    reply = client.get("/api/item/image", params={"id": ITEM})
    assert reply.status_code == 409 and ITEM in reply.json()["detail"]
    assert client.get("/api/item/image", params={"id": "tops/000002/0"}).status_code == 200
    unchecked = TestClient(create_catalogue_app(CatalogueBackend.open(str(catalogue_dir), verify=False)))
    assert unchecked.get("/api/item/image", params={"id": ITEM}).status_code == 200
