"""The ``capret serve`` JSON API on a tiny pipeline: searches, and every limit answered with the right status."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from tiny_pipeline import build_tiny_pipeline

from capret.serve import ServeBackend, create_app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> ServeBackend:
    root = tmp_path_factory.mktemp("serve")
    return ServeBackend.from_pipeline_dir(build_tiny_pipeline(root), device="cpu")


@pytest.fixture(scope="module")
def client(backend: ServeBackend) -> TestClient:
    return TestClient(create_app(backend, max_upload_bytes=200_000), raise_server_exceptions=False)


def _png(path: Path) -> bytes:
    return path.read_bytes()


def _photo(backend: ServeBackend, gallery_id: str = "000004/0") -> bytes:
    return backend.entry(gallery_id).image.read_bytes()


def test_page_assets_info_and_docs(client: TestClient, backend: ServeBackend) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "image-form" in page.text and "composed-form" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/../app.py").status_code == 404
    info = client.get("/api/info").json()
    assert info["gallery_size"] == len(backend.entries) == 9
    assert info["captioner"] and "dual-stream" in info["composed_methods"]
    schema = client.get("/openapi.json").json()
    assert {"/api/search/image", "/api/search/composed", "/api/gallery", "/api/info"} <= set(schema["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text and "cdn" not in docs.text.lower()


def test_image_search_upload_and_by_id(client: TestClient, backend: ServeBackend) -> None:
    upload = client.post(
        "/api/search/image", files={"image": ("q.png", _photo(backend), "image/png")}, data={"k": "5"}
    )
    assert upload.status_code == 200, upload.text
    body = upload.json()
    assert body["results"][0]["id"] == "000004/0"  # the same photo is its own nearest neighbour
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
    assert body["items"][0]["caption"] and body["query_crop"].startswith("data:image/jpeg;base64,")
    assert {"detect", "caption", "embed", "search", "total"} <= set(body["timings_ms"])
    assert "image" not in body["results"][0]  # no server path reaches a client
    image_only = client.post(
        "/api/search/image",
        files={"image": ("q.png", _photo(backend), "image/png")},
        data={"k": "5", "use_captions": "false"},
    ).json()
    assert image_only["items"][0]["caption"] is None and image_only["use_captions"] is False
    reranked = client.post(
        "/api/search/image",
        files={"image": ("q.png", _photo(backend), "image/png")},
        data={"k": "5", "rerank": "true"},
    ).json()
    assert reranked["rerank"] is True and reranked["timings_ms"]["rerank"] > 0
    by_id = client.post("/api/search/image", data={"gallery_id": "000007/0", "k": "3"})
    assert by_id.status_code == 200 and by_id.json()["source"] == "000007/0"
    assert by_id.json()["results"][0]["id"] == "000007/0"


def test_composed_turns(client: TestClient, backend: ServeBackend) -> None:
    first = client.post(
        "/api/search/composed",
        files={"image": ("r.png", _photo(backend, "000002/0"), "image/png")},
        data={"text": "is red with shorter sleeves", "k": "4"},
    )
    assert first.status_code == 200, first.text
    results = first.json()["results"]
    assert len(results) == 4 and first.json()["method"] == "dual-stream"
    # the next turn takes a result as the reference, by id
    second = client.post(
        "/api/search/composed", data={"reference_id": results[1]["id"], "text": "in blue", "k": "4"}
    )
    assert second.status_code == 200 and second.json()["source"] == results[1]["id"]
    # the composed query depends on the text (the text takes the caption's place in the fusion)
    other = client.post(
        "/api/search/composed", data={"reference_id": results[1]["id"], "text": "a long black coat", "k": "4"}
    )
    assert [r["score"] for r in other.json()["results"]] != [r["score"] for r in second.json()["results"]]


def test_gallery_listing_and_images(client: TestClient) -> None:
    listing = client.get("/api/gallery", params={"limit": 3}).json()
    assert listing["total"] == 9 and len(listing["items"]) == 3
    image = client.get("/api/gallery/image", params={"id": listing["items"][0]["id"]})
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    Image.open(io.BytesIO(image.content)).verify()


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "/etc/passwd", "000001/../../x", "a\\b", "%2e%2e"])
def test_path_like_ids_never_reach_the_file_system(client: TestClient, bad_id: str) -> None:
    response = client.get("/api/gallery/image", params={"id": bad_id})
    assert response.status_code in (400, 404)
    response = client.post("/api/search/image", data={"gallery_id": bad_id})
    assert response.status_code in (400, 404)


def test_unknown_id_404_and_bad_requests(client: TestClient) -> None:
    assert client.get("/api/gallery/image", params={"id": "999999/0"}).status_code == 404
    assert client.post("/api/search/image", data={"gallery_id": "999999/0"}).status_code == 404
    assert client.post("/api/search/image", data={"k": "5"}).status_code == 422  # neither upload nor id
    assert client.post("/api/search/image", data={"gallery_id": "000001/0", "k": "0"}).status_code == 422
    bad_method = client.post(
        "/api/search/composed", data={"reference_id": "000001/0", "text": "x", "method": "y"}
    )
    assert bad_method.status_code == 422 and "dual-stream" in bad_method.json()["detail"]


def test_upload_limits_413_and_415(client: TestClient, backend: ServeBackend) -> None:
    big = b"\x89PNG" + b"0" * 300_000
    too_big = client.post("/api/search/image", files={"image": ("big.png", big, "image/png")})
    assert too_big.status_code == 413
    text = client.post("/api/search/image", files={"image": ("x.png", b"not an image at all", "image/png")})
    assert text.status_code == 415
    truncated = _photo(backend)[:60]
    assert (
        client.post("/api/search/image", files={"image": ("t.png", truncated, "image/png")}).status_code
        == 415
    )
    empty = client.post("/api/search/image", files={"image": ("e.png", b"", "image/png")})
    assert empty.status_code == 415


def test_internal_errors_hide_the_traceback(backend: ServeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    client = TestClient(create_app(backend), raise_server_exceptions=False)

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret detail /home/user/private")

    monkeypatch.setattr(backend, "image_search", explode)
    response = client.post("/api/search/image", data={"gallery_id": "000001/0"})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert "Traceback" not in response.text and "secret" not in response.text


def test_concurrency_limit_answers_503(backend: ServeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    client = TestClient(create_app(backend, max_concurrency=1), raise_server_exceptions=False)
    release = threading.Event()
    original = backend.image_search

    def slow(*args: object, **kwargs: object) -> object:
        release.wait(5)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(backend, "image_search", slow)
    statuses: list[int] = []
    worker = threading.Thread(
        target=lambda: statuses.append(
            client.post("/api/search/image", data={"gallery_id": "000001/0"}).status_code
        )
    )
    worker.start()
    time.sleep(0.3)  # the first search holds the only slot
    start = time.monotonic()
    second = client.post("/api/search/image", data={"gallery_id": "000002/0"})
    waited = time.monotonic() - start
    release.set()
    worker.join(10)
    assert second.status_code == 503 and statuses == [200]
    assert waited < 1.0 and int(second.headers["retry-after"]) >= 1  # at once, saying when to come back


def test_serve_cli_builds_a_pipeline_from_checkpoint_and_gallery(
    backend: ServeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``capret serve --checkpoint M --gallery DIR`` indexes the gallery (once) and serves it; uvicorn is
    replaced by a probe that checks the app it would run."""
    import capret.serve as serve_pkg
    from capret.cli.main import main

    root = Path(backend.pipeline.gallery.directory).parent
    served: list[object] = []

    def probe(app: object, *, host: str, port: int) -> None:
        client = TestClient(app, base_url=f"http://{host}:{port}")  # type: ignore[arg-type]
        served.append((host, port, client.get("/api/info").json()["gallery_size"]))

    monkeypatch.setattr(serve_pkg, "serve", probe)
    argv = ["serve", "--checkpoint", str(root / "model"), "--gallery", str(root / "shop")]
    assert main([*argv, "--workdir", str(tmp_path / "w"), "--port", "8123"]) == 0
    assert served == [("127.0.0.1", 8123, 9)]  # localhost unless --host says otherwise
    assert (tmp_path / "w" / "pipeline" / "pipeline.json").is_file()
    assert main(["serve", "--checkpoint", str(root / "model")]) == 2  # --gallery missing: one-line error


def test_combiner_method_matches_a_direct_computation(backend: ServeBackend, tmp_path: Path) -> None:
    """A Combiner checkpoint loaded with ``--combiner``: the served ranking equals composed features computed
    directly (CLIP image + text features -> fuser -> cosine against the gallery crops' CLIP features)."""
    import numpy as np
    import torch
    from repo_paths import CONFIGS
    from tiny_cir import make_tiny_clip, write_cirr

    from capret.cli import train as train_cli
    from capret.inference.cir.combiner import load_cir_model
    from capret.serve.backends import CombinerMethod, crop_box

    clip_dir = make_tiny_clip(tmp_path / "clip")
    argv = [
        "--config",
        str(CONFIGS / "cirr_combiner.yaml"),
        f"data.root={write_cirr(tmp_path / 'cirr')}",
        f"model.clip.name={clip_dir}",
        f"trainer.output_dir={tmp_path / 'run'}",
        "stage=1",
        "stage1.batch_size=10",
        "stage1.epochs=1",
        "data.feature_cache=null",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.num_workers=0",
    ]
    assert train_cli.main(argv) == 0
    checkpoint = tmp_path / "run" / "stage1" / "best"
    method = CombinerMethod(checkpoint, backend.entries, device="cpu")
    backend.composed[method.name] = method
    client = TestClient(create_app(backend))
    served = client.post(
        "/api/search/composed",
        data={"reference_id": "000002/0", "text": "a red dress", "k": "9", "method": "combiner"},
    )
    assert served.status_code == 200, served.text

    clip, fuser, _ = load_cir_model(checkpoint)
    with torch.no_grad():

        def image_feature(entry_id: str) -> torch.Tensor:
            entry = backend.entry(entry_id)
            return clip.image_features(clip.transform(crop_box(Image.open(entry.image), entry.box))[None])

        gallery = torch.nn.functional.normalize(
            torch.cat([image_feature(e.id) for e in backend.entries]), dim=-1
        )
        text = clip.text_features(**clip.tokenize(["a red dress"]))
        query = torch.nn.functional.normalize(fuser(image_feature("000002/0"), text), dim=-1)
        expected = np.argsort(-(query @ gallery.T)[0].numpy(), kind="stable")
    assert [r["id"] for r in served.json()["results"]] == [backend.entries[i].id for i in expected]
