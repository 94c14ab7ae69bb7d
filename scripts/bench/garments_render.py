"""Render speed of the garment world on one process: images per second, overall and per part.

    python scripts/bench/garments_render.py --identities 120 --out /tmp/garments_bench

Prints JSON: the build summary's counts, wall seconds, images/s, CPU seconds of this process (so a loaded
machine's figure can be told from the renderer's own cost) and the 1-minute load average at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

from capret.data.garments import build_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--identities", type=int, default=120)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    summary = build_world(args.out, seed=args.seed, identities=args.identities, size=args.size)
    wall = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    images = summary.counts["images"]
    print(json.dumps({
        "identities": args.identities, "size": args.size, "images": images, "counts": summary.counts,
        "wall_seconds": round(wall, 2), "images_per_second": round(images / wall, 2),
        "cpu_seconds": round(cpu, 2), "images_per_cpu_second": round(images / cpu, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
