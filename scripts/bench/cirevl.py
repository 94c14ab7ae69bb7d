"""CIReVL's model steps against a loopback chat-completions server: first run vs cached rerun.

``--queries`` CIR queries over ``--references`` reference images (several queries share a reference, as in
CIRR/FashionIQ) go through :func:`capret.inference.cir.cirevl.edited_descriptions`: one description request per
unique reference and one rewrite request per unique (reference, caption), each taking ``--latency`` seconds on
the server, ``--concurrency`` in flight. The rerun reads everything from the caption store. Prints ONE JSON
object; the target is zero requests and well under a second for the rerun.

    python scripts/bench/cirevl.py [--queries 200] [--references 80] [--latency 0.05] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# scripts/bench/captioning.py would shadow the captioning package: drop this folder from the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from PIL import Image  # noqa: E402

from capret.inference.cir.cirevl import CirevlOptions, edited_descriptions  # noqa: E402
from capret.testing import ChatServer, reply_for  # noqa: E402
from captioning.backends import create_backend  # noqa: E402


def _editor(payload: dict[str, Any]) -> str:
    system = " ".join(str(m["content"]) for m in payload["messages"] if m["role"] == "system")
    if "edit image descriptions" not in system:
        return reply_for(payload)
    change = re.search(r"Requested change: (.*)", payload["messages"][-1]["content"])
    return f"Edited Description: a photo that {change.group(1) if change else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--references", type=int, default=80)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request on the server")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    refs = [f"img{i % args.references:05d}" for i in range(args.queries)]
    mods = [
        f"has {i % 7 + 1} more objects and is {['red', 'blue', 'green'][i % 3]}" for i in range(args.queries)
    ]
    images = {r: Image.new("RGB", (64, 48), (hash(r) % 256, 90, 160)) for r in set(refs)}
    out: dict[str, Any] = {
        "queries": args.queries,
        "references": args.references,
        "latency_s": args.latency,
        "concurrency": args.concurrency,
    }
    with tempfile.TemporaryDirectory() as tmp, ChatServer(latency=args.latency, responder=_editor) as server:
        options = CirevlOptions(store=Path(tmp) / "store.jsonl", batch_size=64, progress=False)

        def make() -> Any:
            return create_backend(
                "openai", base_urls=[server.base_url], vlm="m", concurrency=args.concurrency
            )

        for run in ("first", "rerun"):
            before, start = server.requests, time.perf_counter()
            _, report = edited_descriptions(
                dataset="bench", references=refs, modifications=mods, load_image=images.__getitem__,
                backend_name="openai", make_backend=make, options=options,
            )  # fmt: skip
            out[f"{run}_seconds"] = round(time.perf_counter() - start, 3)
            out[f"{run}_requests"] = server.requests - before
            out[f"{run}_fallbacks"] = report.fallbacks
    serial = out["first_requests"] * args.latency
    out["first_vs_serial_speedup"] = round(serial / out["first_seconds"], 1) if out["first_seconds"] else None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
