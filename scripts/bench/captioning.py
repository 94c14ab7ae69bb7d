"""Captioning throughput against a loopback chat-completions server: concurrency 1 vs 16.

Every request to the server takes ``--latency`` seconds (default 100 ms, a realistic small-VLM latency), so
throughput is bound by how many requests are in flight. Items run through the full dialogue (description,
``--rounds`` question/answer rounds, summary) and are written to a real caption store. Prints ONE JSON object;
the target is a speed-up of at least 8x at concurrency 16.

    python scripts/bench/captioning.py [--latency 0.1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

# This file is itself named captioning.py: drop its folder from the import path so that
# ``import captioning`` finds the package, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from PIL import Image  # noqa: E402

from capret.testing import ChatServer  # noqa: E402
from captioning.backends import create_backend  # noqa: E402
from captioning.loop import LoopConfig  # noqa: E402
from captioning.prompts import get_prompt_set  # noqa: E402
from captioning.runner import caption_targets  # noqa: E402
from captioning.sources import CaptionTarget  # noqa: E402
from captioning.store import CaptionStore  # noqa: E402


def _image(seed: int) -> Image.Image:
    return Image.new("RGB", (96, 128), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256))


def _measure(
    *, server: ChatServer, concurrency: int, items: int, rounds: int, batch_size: int, out: Path
) -> dict[str, Any]:
    targets = [
        CaptionTarget(
            key=f"bench/{i:06d}/1", open_image=partial(_image, i), bbox=(8, 8, 88, 120), category="dress"
        )
        for i in range(items)
    ]
    before = server.requests
    with (
        CaptionStore(out) as store,
        create_backend(
            "openai", base_urls=[server.base_url], vlm="bench", concurrency=concurrency, timeout=30
        ) as backend,
    ):
        summary = caption_targets(
            targets,
            store=store,
            backend=backend,
            prompts=get_prompt_set("capret-chat-v1"),
            config=LoopConfig(rounds=rounds),
            batch_size=batch_size,
            progress=False,
        )
    if summary.failed:
        raise RuntimeError(f"benchmark items failed: {summary.failure_reasons}")
    return {
        "concurrency": concurrency,
        "items": items,
        "requests": server.requests - before,
        "seconds": summary.seconds,
        "items_per_second": round(summary.done / summary.seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.1, help="seconds per request (default 0.1)")
    parser.add_argument("--rounds", type=int, default=2, help="question rounds per item (default 2)")
    parser.add_argument("--items", type=int, default=16, help="items at concurrency 1 (x8 at 16)")
    parser.add_argument("--batch-size", type=int, default=64, help="items per batch (default 64)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ChatServer(latency=args.latency) as server:
        common = {"server": server, "rounds": args.rounds, "batch_size": args.batch_size}
        serial = _measure(concurrency=1, items=args.items, out=Path(tmp) / "c1.jsonl", **common)
        parallel = _measure(concurrency=16, items=8 * args.items, out=Path(tmp) / "c16.jsonl", **common)
    speedup = parallel["items_per_second"] / serial["items_per_second"]
    print(
        json.dumps(
            {
                "benchmark": "captioning_openai_loopback",
                "latency_s": args.latency,
                "rounds": args.rounds,
                "requests_per_item": 2 * args.rounds + 2,
                "batch_size": args.batch_size,
                "concurrency_1": serial,
                "concurrency_16": parallel,
                "speedup": round(speedup, 2),
                "target_speedup": 8.0,
                "meets_target": speedup >= 8.0,
            }
        )
    )


if __name__ == "__main__":
    main()
