"""``capret serve`` in a real browser: headless Debian Chromium driven by Playwright.

The page is served by uvicorn on 127.0.0.1 from a tiny pipeline; the test uploads a photo, waits for the ranked
lists (with and without captions), then takes two turns of composed refinement ("use as reference" on a result),
and checks the DOM and that a screenshot is not blank. CI installs Debian's chromium (``.ci/run``).
"""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_pipeline import build_tiny_pipeline

from capret.serve import ServeBackend, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="Debian chromium not installed (apt-get install chromium)"
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    import uvicorn

    root = tmp_path_factory.mktemp("browser")
    backend = ServeBackend.from_pipeline_dir(build_tiny_pipeline(root), device="cpu")
    port = _free_port()
    config = uvicorn.Config(create_app(backend), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    assert uv.started, "uvicorn did not start"
    yield {"url": f"http://127.0.0.1:{port}/", "backend": backend, "root": root}
    uv.should_exit = True
    thread.join(10)


def test_page_in_chromium(server: dict[str, object], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    backend = server["backend"]
    assert isinstance(backend, ServeBackend)
    photo = tmp_path / "street.png"
    Image.open(backend.entry("000003/0").image).save(photo)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(str(server["url"]))
        page.wait_for_function("document.querySelector('#info').textContent.includes('gallery items')")
        assert "9 gallery items" in page.inner_text("#info")

        # image to image: upload, both columns (with / without captions) appear
        page.set_input_files("#image-file", str(photo))
        page.click("#image-go")
        page.wait_for_selector("#image-results .column:nth-child(2) .card", timeout=60_000)
        columns = page.query_selector_all("#image-results .column")
        assert [c.query_selector("h3").inner_text() for c in columns] == ["with captions", "without captions"]
        first_ids = [c.get_attribute("data-id") for c in columns[0].query_selector_all(".card")]
        assert first_ids[0] == "000003/0" and len(first_ids) == 8
        assert "Caption built for the query item" in page.inner_text("#query-caption")
        assert page.eval_on_selector("#query-crop", "img => img.naturalWidth") > 0
        shot = page.screenshot(full_page=True)

        # composed query: reference from the gallery, then "use as reference" on a result for a second turn
        page.click("#tab-composed")
        page.select_option("#composed-gallery", "000001/0")
        page.fill("#composed-text", "is red with shorter sleeves")
        page.click("#composed-go")
        page.wait_for_selector("#history .turn .card", timeout=60_000)
        chosen = page.query_selector_all("#history .turn .card")[1]
        chosen_id = chosen.get_attribute("data-id")
        chosen.query_selector(".use-reference").click()
        assert page.input_value("#composed-gallery") == chosen_id
        page.fill("#composed-text", "in blue")
        page.click("#composed-go")
        page.wait_for_function("document.querySelectorAll('#history .turn').length === 2", timeout=60_000)
        turns = page.query_selector_all("#history .turn")
        assert "Turn 2" in turns[0].inner_text() and chosen_id in turns[0].inner_text()
        assert "Turn 1" in turns[1].inner_text()  # the history of turns stays visible
        composed_shot = page.screenshot(full_page=True)
        browser.close()
    assert not errors, errors
    for png in (shot, composed_shot):
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
        assert pixels.std() > 10, "the screenshot is blank"
