"""The Pareto-chart bench's two bits of arithmetic (``scripts/bench/pareto.py``) against brute-force references."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np


def _bench() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "pareto.py"
    spec = importlib.util.spec_from_file_location("pareto_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_average_precision_matches_the_definition() -> None:
    ap = _bench().average_precision
    assert ap([True, False, True], 2) == (1 / 1 + 2 / 3) / 2
    assert ap([False, True], 5) == (1 / 2) / 2  # truncated list: at most len(hits) relevant can be found
    assert ap([False, False], 1) == 0.0 and ap([], 3) == 0.0 and ap([True], 0) == 0.0
    rng = np.random.default_rng(0)
    for _ in range(50):
        hits = list(rng.random(8) < 0.3)
        relevant = int(rng.integers(1, 12))
        precisions = [np.mean(hits[: i + 1]) for i, h in enumerate(hits) if h]
        assert np.isclose(ap(hits, relevant), sum(precisions) / min(8, relevant))


def test_pareto_front_against_all_pairs() -> None:
    front = _bench().pareto_front
    rng = np.random.default_rng(1)
    for _ in range(30):
        points = [(float(a), float(b)) for a, b in rng.integers(0, 6, size=(9, 2))]
        expected = [
            i
            for i, (lat, q) in enumerate(points)
            if not any(o[0] <= lat and o[1] >= q and o != (lat, q) for o in points)
        ]
        got = front(points)
        assert sorted(got) == expected
        assert [points[i][0] for i in got] == sorted(points[i][0] for i in got)
    assert front([(1.0, 0.5), (2.0, 0.4), (0.5, 0.6)]) == [2]
    assert front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # ties dominate neither
