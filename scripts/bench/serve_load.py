"""Server memory under a burst of maximal uploads: peak RSS of ``capret serve`` against its idle RSS (one JSON object).

Issue 23 measured 8 concurrent uploads of a 131 KB PNG that decodes to 39.7 Mpx taking ``capret serve
--max-concurrency 2`` from 1.0 GB to 5.4 GB: images were decoded before the concurrency limit applied. This bench
starts the real server (``capret serve``, its CLI defaults unless flags say otherwise) on the loopback interface
only, builds a small PNG that decodes to just under ``--max-pixels``, sends ``--clients`` concurrent uploads of it
for ``--rounds`` rounds, and samples the server process's resident memory (``/proc/PID/status``) every 10 ms.

Reports idle RSS (after one warm-up search), peak RSS during the bursts, their ratio (goal: under 2 at the
defaults), the kernel's high-water mark, answers by status, and p50/p95 latency of all answers, of the searches
that ran (200) and of the refusals (503, which must come at once). Bounded: at most ``--clients x --rounds``
requests, each with a ``--timeout-s`` limit.

    python scripts/bench/serve_load.py [--pipeline DIR] [--clients 8] [--rounds 2] [--max-concurrency 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# this folder holds a benchmark named captioning.py, which would shadow the captioning package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

HOST = "127.0.0.1"  # loopback only


def _tiny_pipeline(directory: Path) -> Path:
    helpers = Path(__file__).resolve().parents[2] / "tests" / "helpers"
    sys.path.insert(0, str(helpers))
    from tiny_pipeline import build_tiny_pipeline

    # stdout carries only the report: the build's prints (and the tokenizer trainer's, written straight to file
    # descriptor 1 from Rust) go to stderr
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return build_tiny_pipeline(directory)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def maximal_png(max_pixels: int) -> tuple[bytes, int, int]:
    """A PNG that compresses to a few hundred KB but decodes to just under ``max_pixels`` (4:3, 99.5%)."""
    target = int(max_pixels * 0.995)
    width = int((target * 4 / 3) ** 0.5)
    height = target // width
    picture = Image.new("RGB", (width, height), (235, 235, 230))
    draw = ImageDraw.Draw(picture)
    draw.rectangle(
        (width // 4, height // 5, 3 * width // 4, 4 * height // 5), fill=(180, 30, 40)
    )  # a "garment"
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue(), width, height


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for PID {pid}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "p50": round(float(np.percentile(values, 50)), 1),
        "p95": round(float(np.percentile(values, 95)), 1),
        "n": len(values),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", type=Path, default=None, help="pipeline folder (default: a tiny random one)")
    p.add_argument("--clients", type=int, default=8, help="concurrent uploads per round")
    p.add_argument("--rounds", type=int, default=2, help="bursts")
    p.add_argument("--max-concurrency", type=int, default=2, help="capret serve --max-concurrency")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="capret serve --max-pixels")
    p.add_argument("--pixel-budget", type=int, default=None, help="capret serve --pixel-budget")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    args = p.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.rounds <= 10):
        raise SystemExit("--clients must be in 1..64 and --rounds in 1..10 (the bench stays bounded)")

    with tempfile.TemporaryDirectory() as tmp:
        pipeline = args.pipeline or _tiny_pipeline(Path(tmp))
        payload, width, height = maximal_png(args.max_pixels)
        port = _free_port()
        command = [
            sys.executable,
            "-c",
            "from capret.cli.main import main; raise SystemExit(main())",
            "serve",
        ]
        command += ["--pipeline", str(pipeline), "--host", HOST, "--port", str(port), "--device", "cpu"]
        command += ["--max-concurrency", str(args.max_concurrency), "--max-pixels", str(args.max_pixels)]
        if args.pixel_budget is not None:
            command += ["--pixel-budget", str(args.pixel_budget)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            report = _drive(server, port=port, payload=payload, args=args)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    report["image"] = {"width": width, "height": height, "pixels": width * height, "png_bytes": len(payload)}
    report["settings"] = {
        "clients": args.clients,
        "rounds": args.rounds,
        "max_concurrency": args.max_concurrency,
        "max_pixels": args.max_pixels,
        "pixel_budget": args.pixel_budget if args.pixel_budget is not None else args.max_pixels,
        "pipeline": "tiny random model" if args.pipeline is None else str(args.pipeline),
    }
    report["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    print(json.dumps(report, indent=2))


def _drive(
    server: subprocess.Popen[bytes], *, port: int, payload: bytes, args: argparse.Namespace
) -> dict[str, Any]:
    base = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 180
    with httpx.Client(base_url=base, timeout=args.timeout_s) as client:
        while True:
            if server.poll() is not None:
                err = server.stderr.read().decode(errors="replace") if server.stderr else ""
                raise SystemExit(f"capret serve exited with {server.returncode}: {err[-2000:]}")
            try:
                if client.get("/api/info").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("capret serve did not start within 180 s")
            time.sleep(0.2)
        first_id = client.get("/api/gallery", params={"limit": 1}).json()["items"][0]["id"]
        warm = client.post("/api/search/image", data={"gallery_id": first_id})
        warm.raise_for_status()
        time.sleep(1.0)
        idle_kb = _rss_kb(server.pid)

        peak_kb = idle_kb
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak_kb
            while not stop.is_set():
                peak_kb = max(peak_kb, _rss_kb(server.pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        results: list[tuple[int, float, str | None]] = []
        lock = threading.Lock()

        def upload(barrier: threading.Barrier) -> None:
            barrier.wait()
            start = time.perf_counter()
            try:
                answer = client.post("/api/search/image", files={"image": ("max.png", payload, "image/png")})
                status, retry = answer.status_code, answer.headers.get("retry-after")
            except httpx.TransportError as exc:
                status, retry = -1, type(exc).__name__
            with lock:
                results.append((status, (time.perf_counter() - start) * 1000.0, retry))

        started = time.perf_counter()
        for _ in range(args.rounds):
            barrier = threading.Barrier(args.clients)
            threads = [threading.Thread(target=upload, args=(barrier,)) for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(args.timeout_s + 10)
        wall = time.perf_counter() - started
        time.sleep(0.2)
        stop.set()
        sampler.join()
        hwm_kb = _rss_kb(server.pid, "VmHWM")
    statuses: dict[str, int] = {}
    for status, _, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "idle_rss_mb": round(idle_kb / 1024, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "peak_over_idle": round(peak_kb / idle_kb, 3),
        "goal_under_2x_idle": peak_kb < 2 * idle_kb,
        "server_vmhwm_mb": round(hwm_kb / 1024, 1),
        "requests": len(results),
        "statuses": statuses,
        "retry_after_s": sorted(
            {int(r) for s, _, r in results if s == 503 and r is not None and r.isdigit()}
        ),
        "latency_ms": {
            "all": _percentiles([ms for _, ms, _ in results]),
            "ok_200": _percentiles([ms for s, ms, _ in results if s == 200]),
            "busy_503": _percentiles([ms for s, ms, _ in results if s == 503]),
        },
        "wall_s": round(wall, 2),
    }


if __name__ == "__main__":
    main()
