"""Benchmark: vectorised DeepFashion2 retrieval evaluator vs a per-query reference loop of the same algorithm.

Uses the real validation ground truth (``../shared/data/deepfashion2``) and a synthetic result file of at least
25,000 detections (jittered ground-truth boxes, stray boxes, wrong classes, score ties, retrieved lists mixing
true and random shop items). Both evaluators receive the already-loaded lists. Prints one JSON object: both
results (they must be identical), both timings and the speed-up.

Usage: ``python scripts/bench/df2_eval.py [--data DIR] [--seed 0] [--legacy-singleton-bug]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

from capret.evaluation.deepfashion2 import evaluate_retrieval_results

REPO = Path(__file__).resolve().parents[2]


def _reference_module():
    """The reference loop and result synthesiser live in the protocol tests; load them from there."""
    spec = importlib.util.spec_from_file_location("df2_reference", REPO / "tests" / "test_df2_protocol.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "deepfashion2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-detections", type=int, default=25_000)
    p.add_argument("--legacy-singleton-bug", action="store_true")
    args = p.parse_args()
    ref = _reference_module()
    query_gt = json.loads((args.data / "query_gt.json").read_text())
    gallery_gt = json.loads((args.data / "gallery_gt.json").read_text())
    rng = np.random.default_rng(args.seed)
    results: list = []
    while len(results) < args.min_detections:
        results += ref.synthetic_results(rng, query_gt, gallery_gt, per_image=2.4)
    legacy = args.legacy_singleton_bug

    start = time.perf_counter()
    fast = evaluate_retrieval_results(results, query_gt, gallery_gt, legacy_singleton_bug=legacy)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    slow = ref.reference_top_k(results, query_gt, gallery_gt, legacy_singleton_bug=legacy)
    slow_s = time.perf_counter() - start
    print(
        json.dumps(
            {
                "benchmark": "deepfashion2_retrieval_eval",
                "detections": len(results),
                "query_items_style_gt0": fast["num_queries"],
                "legacy_singleton_bug": legacy,
                "identical": fast == slow,
                "evaluator": fast,
                "reference": slow,
                "evaluator_seconds": round(fast_s, 4),
                "reference_seconds": round(slow_s, 4),
                "speedup": round(slow_s / fast_s, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
