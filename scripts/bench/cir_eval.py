"""Benchmark: ``evaluate_cir`` on the real CIRR and CIRCO validation annotations at full size.

``capret-eval cir``, the Combiner's validation and this script share one protocol function
(:func:`capret.inference.cir.benchmarks.evaluate_cir`). The script lays out the real annotation files of
``../shared/data`` (CIRR val: 4,181 queries over 2,297 images; CIRCO val: 220 queries) with small placeholder
images (no image is available here), builds a tiny random CLIP (no download) and a Combiner, and times:

* ``cold``: the evaluation that encodes every gallery image (feature cache empty), with the three shortcut
  baselines, as ``capret-eval cir`` runs it;
* ``warm``: the same with the feature cache filled (what a second method on the same CLIP costs);
* ``validation``: the Combiner's model-selection call (no baselines, cache on) — its metrics must equal the
  ``capret-eval`` path's to the last digit (``same_numbers``), since both are one function.

Prints ONE JSON object.

    python scripts/bench/cir_eval.py [--cirr-queries 4181] [--circo-distractors 2000] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# scripts/bench/captioning.py would shadow the captioning package: drop this folder from the import path
sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

from capret.inference.cir.benchmarks import evaluate_cir, open_benchmark  # noqa: E402
from capret.inference.cir.methods import FuserMethod  # noqa: E402
from capret.inference.cir.search import FeatureOptions  # noqa: E402
from capret.models.clip import load_clip  # noqa: E402
from capret.models.combiner import create_combiner  # noqa: E402
from capret.testing import save_random_clip  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size=(24, 24 + seed % 9, 3), dtype=np.uint8)).save(path)


def _cirr(root: Path, queries: int) -> int:
    captions = json.loads((SHARED / "cirr" / "captions" / "cap.rc2.val.json").read_text())[:queries]
    split = json.loads((SHARED / "cirr" / "image_splits" / "split.rc2.val.json").read_text())
    (root / "cirr" / "captions").mkdir(parents=True)
    (root / "cirr" / "image_splits").mkdir(parents=True)
    (root / "cirr" / "captions" / "cap.rc2.val.json").write_text(json.dumps(captions))
    shutil.copy(SHARED / "cirr" / "image_splits" / "split.rc2.val.json", root / "cirr" / "image_splits")
    for i, relative in enumerate(split.values()):
        _image(root / relative, i)
    return len(split)


def _circo(root: Path, distractors: int) -> int:
    records = json.loads((SHARED / "circo" / "annotations" / "val.json").read_text())
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "val.json").write_text(json.dumps(records))
    ids = {r["reference_img_id"] for r in records} | {g for r in records for g in r["gt_img_ids"]}
    ids |= {900_000 + i for i in range(distractors)}
    for image_id in sorted(ids):
        _image(root / "COCO2017_unlabeled" / "unlabeled2017" / f"{image_id:012d}.jpg", image_id)
    return len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cirr-queries", type=int, default=4181, help="CIRR val queries (all: 4181)")
    parser.add_argument("--circo-distractors", type=int, default=2000, help="extra CIRCO gallery images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: comparable across machines)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    out: dict[str, object] = {"benchmark": "cir_eval", "device": args.device, "torch_threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        words = ["is red", "has long sleeves", "shows two dogs", "a darker background"] * 10
        clip_dir = save_random_clip(base / "clip", preset="tiny", texts=words, vocab_size=400)
        clip = load_clip(clip_dir, device=args.device).eval()
        torch.manual_seed(0)
        fuser = create_combiner("combiner", feature_dim=clip.feature_dim, dropout=0.0).to(args.device).eval()
        method = FuserMethod(
            clip, fuser=fuser, checkpoint=None, stage=2, clip_record={"name": "tiny (random)"}
        )
        sizes = {
            "cirr": _cirr(base / "cirr", args.cirr_queries),
            "circo": _circo(base / "circo", args.circo_distractors),
        }
        for name in ("cirr", "circo"):
            benchmark = open_benchmark(name, root=base / name, split="val")
            options = FeatureOptions(cache_dir=base / f"cache_{name}", batch_size=256)
            start = time.perf_counter()
            cold = evaluate_cir(method, benchmark, options=options)
            cold_s = time.perf_counter() - start
            start = time.perf_counter()
            warm = evaluate_cir(method, benchmark, options=options)
            warm_s = time.perf_counter() - start
            start = time.perf_counter()
            validation = evaluate_cir(method, benchmark, baselines=False, options=options)
            validation_s = time.perf_counter() - start
            out[name] = {
                "queries": len(benchmark.units[0].queries.references),
                "gallery": sizes[name],
                "cold_s": round(cold_s, 2),
                "warm_s": round(warm_s, 2),
                "validation_s": round(validation_s, 2),
                "same_numbers": cold.metrics == warm.metrics == validation.metrics,
                "metrics_random_model": {k: round(v, 4) for k, v in cold.metrics.items()},
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
