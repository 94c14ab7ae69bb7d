"""Bounded server memory and the Host check: admission from the image header before any pixel is decoded
(concurrency, per-image pixels, a total pixel budget), 503 at once with Retry-After, 421 for foreign hosts."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageFile
from tiny_pipeline import build_tiny_pipeline

from capret.serve import ServeBackend, create_app
from capret.serve.admission import Admission, AdmissionRefused, allowed_hosts_for, split_host_header

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> ServeBackend:
    return ServeBackend.from_pipeline_dir(build_tiny_pipeline(tmp_path_factory.mktemp("serve")), device="cpu")


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but that carries almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))


def test_admission_counts_slots_and_pixels() -> None:
    admission = Admission(max_concurrency=3, max_pixels=100, pixel_budget=150)
    first = admission.admit(100)
    with pytest.raises(AdmissionRefused) as busy:
        admission.admit(60)  # a slot is free, the budget is not
    assert busy.value.status == 503 and busy.value.retry_after is not None and busy.value.retry_after >= 1
    small = admission.admit(50)
    gallery = admission.admit(0)
    with pytest.raises(AdmissionRefused, match="3 searches are running"):
        admission.admit(0)
    with pytest.raises(AdmissionRefused) as large:
        admission.admit(101)
    assert large.value.status == 413
    for ticket in (first, small, gallery):
        admission.release(ticket)
    assert admission.running == 0 and admission.pixels_in_use == 0
    with pytest.raises(ValueError, match="pixel_budget"):
        Admission(max_concurrency=1, max_pixels=100, pixel_budget=50)


def test_too_many_pixels_is_refused_from_the_header_without_decoding(
    backend: ServeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = TestClient(create_app(backend, max_pixels=10_000), raise_server_exceptions=False)
    decoded: list[object] = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or original(self))
    bomb = _png_header_only(30_000, 30_000)  # 900 Mpx claimed in 60 bytes
    answer = client.post("/api/search/image", files={"image": ("b.png", bomb, "image/png")})
    assert answer.status_code == 413 and "10000 pixels" in answer.json()["detail"]
    assert decoded == []
    fits = client.post("/api/search/image", files={"image": ("s.png", _png(90, 100), "image/png")})
    assert fits.status_code == 200 and len(decoded) >= 1


def test_pixel_budget_refuses_a_second_large_image_at_once(
    backend: ServeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(backend, max_concurrency=4, max_pixels=20_000, pixel_budget=30_000)
    client = TestClient(app, raise_server_exceptions=False)
    release = threading.Event()
    original = backend.image_search

    def slow(*args: object, **kwargs: object) -> object:
        release.wait(10)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(backend, "image_search", slow)
    statuses: list[int] = []
    first = threading.Thread(
        target=lambda: statuses.append(
            client.post(
                "/api/search/image", files={"image": ("a.png", _png(140, 140), "image/png")}
            ).status_code
        )
    )
    first.start()
    deadline = time.monotonic() + 10
    while app.state.admission.pixels_in_use == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app.state.admission.pixels_in_use == 140 * 140
    decoded: list[object] = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or original_load(self))
    start = time.monotonic()
    second = client.post("/api/search/image", files={"image": ("b.png", _png(130, 130), "image/png")})
    waited = time.monotonic() - start
    assert second.status_code == 503 and "decoded pixels" in second.json()["detail"]
    assert int(second.headers["retry-after"]) >= 1 and waited < 1.0
    assert [im for im in decoded if getattr(im, "size", None) == (130, 130)] == []  # never decoded
    small = threading.Thread(  # a small image still fits beside the large one
        target=lambda: statuses.append(
            client.post(
                "/api/search/image", files={"image": ("c.png", _png(50, 50), "image/png")}
            ).status_code
        )
    )
    small.start()
    time.sleep(0.3)
    release.set()
    first.join(20)
    small.join(20)
    assert statuses == [200, 200] and app.state.admission.running == 0
    assert app.state.admission.pixels_in_use == 0


def test_host_header_checked_against_the_bound_address(backend: ServeBackend) -> None:
    app = create_app(backend, host="127.0.0.1", allowed_hosts=["shop.example"])
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "shop.example", "127.0.0.1"):
        assert client.get("/api/info", headers={"host": host}).status_code == 200, host
    rebound = client.get("/api/info", headers={"host": "attacker.example:8000"})
    assert rebound.status_code == 421 and "attacker.example" in rebound.json()["detail"]
    for bad in ("", "a b", "127.0.0.1:80x", "user@127.0.0.1", "[::1"):
        assert client.get("/api/info", headers={"host": bad}).status_code == 400, bad
    public = TestClient(create_app(backend, host="192.0.2.7"), base_url="http://192.0.2.7:8000")
    assert public.get("/api/info").status_code == 200
    assert public.get("/api/info", headers={"host": "localhost"}).status_code == 421  # not bound to loopback
    unchecked = TestClient(create_app(backend, host="127.0.0.1", allowed_hosts=["*"]))
    assert unchecked.get("/api/info").status_code == 200  # Host "testserver" allowed by "*"


def test_host_helpers() -> None:
    assert split_host_header("Example.COM.:443") == "example.com"
    assert split_host_header("[::1]:8000") == "::1"
    assert split_host_header("host:99999999") is None
    assert allowed_hosts_for("::1") >= {"localhost", "127.0.0.1", "::1"}  # type: ignore[operator]
    assert allowed_hosts_for("0.0.0.0") >= {"localhost", "127.0.0.1"}  # type: ignore[operator]
    assert allowed_hosts_for("10.1.2.3") == frozenset({"10.1.2.3"})
    assert allowed_hosts_for("10.1.2.3", ["*"]) is None


def test_serve_cli_passes_host_and_limits(
    backend: ServeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import capret.serve as serve_pkg
    from capret.cli.main import main

    pipeline = Path(backend.pipeline.gallery.directory).parent / "pipeline"
    seen: list[tuple[int, int]] = []

    def probe(app: object, *, host: str, port: int) -> None:
        client = TestClient(app, base_url=f"http://{host}:{port}")  # type: ignore[arg-type]
        assert client.get("/api/info").status_code == 200
        assert client.get("/api/info", headers={"host": "evil.example"}).status_code == 421
        admission = app.state.admission  # type: ignore[attr-defined]
        seen.append((admission.max_pixels, admission.pixel_budget))

    monkeypatch.setattr(serve_pkg, "serve", probe)
    argv = ["serve", "--pipeline", str(pipeline), "--max-pixels", "1000", "--pixel-budget", "3000"]
    assert main(argv) == 0
    assert seen == [(1000, 3000)]
    capsys.readouterr()
    assert main(["serve", "--pipeline", str(pipeline), "--max-pixels", "1000", "--pixel-budget", "10"]) == 2
    assert "--pixel-budget" in capsys.readouterr().err
