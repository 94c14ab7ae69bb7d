"""Screenshot of the ``capret serve`` page for the README: serve a pipeline folder, search with a photo in headless
Chromium (Debian's package), save a PNG.

    python scripts/serve_screenshot.py --pipeline qs/pipeline --photo qs/data/validation/image/000001.jpg \
        --out docs/serve.png
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", type=Path, required=True)
    parser.add_argument("--photo", type=Path, required=True, help="query photo to upload")
    parser.add_argument("--out", type=Path, default=Path("docs/serve.png"))
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()

    import uvicorn
    from playwright.sync_api import sync_playwright

    from capret.serve import ServeBackend, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(ServeBackend.from_pipeline_dir(args.pipeline)),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": args.width, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("document.querySelector('#info').textContent.includes('gallery items')")
        page.set_input_files("#image-file", str(args.photo))
        page.click("#image-go")
        page.wait_for_selector("#image-results .column:nth-child(2) .card img", timeout=120_000)
        page.wait_for_timeout(1500)  # let the result thumbnails load
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
        browser.close()
    server.should_exit = True
    print(args.out)


if __name__ == "__main__":
    main()
