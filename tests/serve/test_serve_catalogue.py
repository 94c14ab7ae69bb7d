"""``capret serve --catalogue``: the page and JSON API search a catalogue with a category filter; the write
endpoints exist only with ``allow_writes`` and answer only to the bearer token; the CLI refuses writes without one."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from tiny_pipeline import write_shop_photos
from tiny_text import save_tiny_dual_stream

from capret.cli.main import main
from capret.serve.catalogue import CatalogueBackend, create_catalogue_app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def catalogue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve_catalogue")
    model = save_tiny_dual_stream(root / "model", pad="squarepad")
    write_shop_photos(root / "photos" / "tops", count=4)
    write_shop_photos(root / "photos" / "skirts", count=3, seed=3)
    folder = root / "cat"
    assert (
        main(["catalogue", "create", "--model", str(model), "--root", str(root / "photos"), str(folder)]) == 0
    )
    for category in ("tops", "skirts"):
        argv = ["catalogue", "add", str(folder), str(root / "photos" / category), "--category", category]
        assert main([*argv, "--no-progress"]) == 0
    return folder


def _png(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).save(buffer, format="PNG")
    return buffer.getvalue()


def test_search_with_category_filter_and_no_write_routes(catalogue_dir: Path) -> None:
    backend = CatalogueBackend.open(str(catalogue_dir))
    client = TestClient(create_catalogue_app(backend))
    assert "category" in client.get("/").text
    assert client.get("/api/info").json()["rows"] == 7
    assert client.get("/api/categories").json() == {"skirts": 3, "tops": 4}
    photo = _png(catalogue_dir.parent / "photos" / "tops" / "000002.png")
    reply = client.post("/api/search", files={"image": ("q.png", photo, "image/png")}, data={"k": "3"})
    assert reply.status_code == 200 and reply.json()["results"][0]["id"] == "tops/000002/0"
    reply = client.post(
        "/api/search", files={"image": ("q.png", photo, "image/png")}, data={"k": "10", "category": "skirts"}
    )
    assert [r["category"] for r in reply.json()["results"]] == ["skirts"] * 3
    crop = client.get("/api/item/image", params={"id": "skirts/000001/0"})
    assert crop.status_code == 200 and crop.headers["content-type"] == "image/jpeg"
    assert client.get("/api/item/image", params={"id": "../etc/0"}).status_code == 400
    assert client.post("/api/items", files={"image": ("q.png", photo, "image/png")}).status_code in (404, 405)
    assert client.post("/api/items/remove", data={"id": "tops/000001/0"}).status_code in (404, 405)


def test_writes_need_the_token(catalogue_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token"):
        create_catalogue_app(CatalogueBackend.open(str(catalogue_dir)), allow_writes=True)
    backend = CatalogueBackend.open(str(catalogue_dir))
    client = TestClient(create_catalogue_app(backend, allow_writes=True, token="s3cret"))
    new = write_shop_photos(tmp_path / "new", count=1, seed=11) / "000001.png"
    upload = {"image": ("new.png", _png(new), "image/png")}
    assert client.post("/api/items", files=upload, data={"category": "tops"}).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.post("/api/items", files=upload, headers=wrong).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    reply = client.post("/api/items", files=upload, data={"category": "tops"}, headers=auth)
    assert reply.status_code == 200 and reply.json()["added_rows"] == 1
    again = client.post("/api/items", files=upload, data={"category": "tops"}, headers=auth).json()
    assert again["added_rows"] == 0 and again["present"] == 1  # same upload: same file, already there
    assert client.get("/api/categories").json()["tops"] == 5
    reply = client.post("/api/items/remove", data={"id": ["tops/000004/0"]}, headers=auth)
    assert reply.json()["removed_rows"] == 1
    assert client.post("/api/items/remove", data={"id": ["tops/000003/0"]}).status_code == 401
    assert client.get("/api/info").json()["rows"] == 7


def test_cli_refuses_writes_without_token(
    catalogue_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CAPRET_SERVE_TOKEN", raising=False)
    assert main(["serve", "--catalogue", str(catalogue_dir), "--allow-writes"]) == 2
    assert "token" in capsys.readouterr().err
