"""What the integrity checks cost: SHA-256 of checkpoint/shard files, the DeepFashion2 index signature (a stat of
every annotation file) and ``require_finite`` on a feature matrix. Prints ONE JSON object.

    python scripts/bench/integrity.py [--mb 64] [--files 20000] [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=64, help="size of the file to checksum (MiB)")
    parser.add_argument("--files", type=int, default=20000, help="annotation files in the signature scan")
    parser.add_argument("--rows", type=int, default=100000, help="rows of the [rows, 256] feature matrix")
    args = parser.parse_args()
    from capret.data.deepfashion2 import _scan
    from capret.errors import require_finite
    from capret.io import file_sha256

    out: dict[str, float | int] = {"mb": args.mb, "files": args.files, "rows": args.rows}
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / "weights.bin"
        blob.write_bytes(os.urandom(args.mb << 20))
        start = time.perf_counter()
        file_sha256(blob)
        seconds = time.perf_counter() - start
        out["sha256_mb_per_s"] = round(args.mb / seconds, 1)
        annos = Path(tmp) / "annos"
        annos.mkdir()
        for i in range(args.files):
            (annos / f"{i + 1:06d}.json").write_text('{"source": "user", "pair_id": 1}')
        start = time.perf_counter()
        _scan(annos)
        out["signature_scan_s"] = round(time.perf_counter() - start, 3)
        out["signature_scan_us_per_file"] = round(1e6 * out["signature_scan_s"] / args.files, 2)
    features = np.random.default_rng(0).standard_normal((args.rows, 256)).astype(np.float32)
    start = time.perf_counter()
    require_finite(features, what="features")
    out["require_finite_ms"] = round(1000 * (time.perf_counter() - start), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
