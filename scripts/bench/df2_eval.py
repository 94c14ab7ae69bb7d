"""Benchmark: vectorised DeepFashion2 retrieval evaluator vs a straightforward per-query loop of the same algorithm.

Uses the real validation ground truth (``../shared/data/deepfashion2``) and a synthetic result file of at least
25,000 detections (jittered ground-truth boxes, stray boxes, wrong classes, score ties, retrieved lists mixing
true and random shop items). Every evaluator receives the already-loaded lists (JSON parsing is not timed).

Compared (both protocol modes, default and ``legacy_singleton_bug=True``, must give identical results):

* ``evaluator``: :func:`capret.evaluation.deepfashion2.evaluate_retrieval_results`;
* ``straightforward_loop``: ``straightforward_top_k`` in ``tests/test_df2_protocol.py``, the official script's
  structure in plain Python with dict lookups by image id (the reference the speed goal is stated against);
* ``numpy_reference``: ``reference_top_k`` in the same file, numpy-grouped with pycocotools IoU.

Timings are the best of ``--repeats`` runs (wall clock and process CPU time, measured separately) in the
default mode. Prints one JSON object with ``target_speedup`` (50) and whether it was met.

Usage: ``python scripts/bench/df2_eval.py [--data DIR] [--seed 0] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from capret.evaluation.deepfashion2 import evaluate_retrieval_results

REPO = Path(__file__).resolve().parents[2]
TARGET_SPEEDUP = 50.0


def _reference_module():
    """The references and the result synthesiser live in the protocol tests; load them from there."""
    spec = importlib.util.spec_from_file_location("df2_reference", REPO / "tests" / "test_df2_protocol.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _best_times(fn: Callable[[], Any], *, repeats: int) -> tuple[float, float]:
    """``(best wall seconds, best CPU seconds)`` over ``repeats`` calls (CPU time is robust to a busy machine)."""
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "deepfashion2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-detections", type=int, default=25_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    ref = _reference_module()
    query_gt = json.loads((args.data / "query_gt.json").read_text())
    gallery_gt = json.loads((args.data / "gallery_gt.json").read_text())
    rng = np.random.default_rng(args.seed)
    results: list = []
    while len(results) < args.min_detections:
        results += ref.synthetic_results(rng, query_gt, gallery_gt, per_image=2.4)

    methods = {
        "evaluator": evaluate_retrieval_results,
        "straightforward_loop": ref.straightforward_top_k,
        "numpy_reference": ref.reference_top_k,
    }
    outputs = {
        legacy: {
            name: fn(results, query_gt, gallery_gt, legacy_singleton_bug=legacy)
            for name, fn in methods.items()
        }
        for legacy in (False, True)
    }
    times = {
        name: _best_times(lambda fn=fn: fn(results, query_gt, gallery_gt), repeats=args.repeats)
        for name, fn in methods.items()
    }
    fast_wall, fast_cpu = times["evaluator"]
    loop_wall, loop_cpu = times["straightforward_loop"]
    np_wall, np_cpu = times["numpy_reference"]
    speedup = loop_wall / fast_wall
    print(
        json.dumps(
            {
                "benchmark": "deepfashion2_retrieval_eval",
                "detections": len(results),
                "query_items_style_gt0": outputs[False]["evaluator"]["num_queries"],
                "repeats": args.repeats,
                "identical": all(
                    out["evaluator"] == out["straightforward_loop"] == out["numpy_reference"]
                    for out in outputs.values()
                ),
                "identical_default": outputs[False]["evaluator"] == outputs[False]["straightforward_loop"],
                "identical_legacy_singleton_bug": outputs[True]["evaluator"]
                == outputs[True]["straightforward_loop"],
                "evaluator": outputs[False]["evaluator"],
                "evaluator_legacy_singleton_bug": outputs[True]["evaluator"],
                "evaluator_seconds": round(fast_wall, 4),
                "straightforward_loop_seconds": round(loop_wall, 4),
                "numpy_reference_seconds": round(np_wall, 4),
                "evaluator_cpu_seconds": round(fast_cpu, 4),
                "straightforward_loop_cpu_seconds": round(loop_cpu, 4),
                "numpy_reference_cpu_seconds": round(np_cpu, 4),
                "speedup_vs_straightforward_loop": round(speedup, 2),
                "speedup_vs_straightforward_loop_cpu": round(loop_cpu / fast_cpu, 2),
                "speedup_vs_numpy_reference": round(np_wall / fast_wall, 2),
                "target_speedup": TARGET_SPEEDUP,
                "target_met": speedup >= TARGET_SPEEDUP,
            }
        )
    )


if __name__ == "__main__":
    main()
