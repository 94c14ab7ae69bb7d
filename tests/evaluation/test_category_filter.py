"""The category-filtered baseline against a plain loop: same-category gallery first, by similarity."""

from __future__ import annotations

import numpy as np

from capret.evaluation.category_filter import category_filtered_metrics


def _loop_reference(q, g, ql, gl, qc, gc, ks):
    aps, hits = [], {k: [] for k in ks}
    for i in range(len(q)):
        sims = [float(q[i] @ g[j]) for j in range(len(g))]
        order = sorted(range(len(g)), key=lambda j: (qc[i] != gc[j], -sims[j], j))
        rel = [gl[j] == ql[i] for j in order]
        if not any(rel):
            continue
        found, precisions = 0, []
        for rank, r in enumerate(rel, start=1):
            if r:
                found += 1
                precisions.append(found / rank)
        aps.append(sum(precisions) / found)
        for k in ks:
            hits[k].append(any(rel[:k]))
    return float(np.mean(aps)), {k: float(np.mean(v)) for k, v in hits.items()}


def test_category_filtered_metrics_match_a_loop() -> None:
    rng = np.random.default_rng(0)
    q = rng.normal(size=(30, 8)).astype(np.float32)
    g = rng.normal(size=(50, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    ql, gl = rng.integers(0, 12, 30), rng.integers(0, 12, 50)
    qc = [str(c) for c in rng.integers(0, 3, 30)]
    gc = [str(c) for c in rng.integers(0, 3, 50)]
    got = category_filtered_metrics(q, g, ql, gl, query_categories=qc, gallery_categories=gc, ks=[1, 5])
    mean_ap, recalls = _loop_reference(q, g, ql, gl, qc, gc, [1, 5])
    assert abs(got["map"] - mean_ap) < 1e-6
    assert abs(got["recall@1"] - recalls[1]) < 1e-6 and abs(got["recall@5"] - recalls[5]) < 1e-6
    # one category everywhere: exactly the unfiltered ranking
    same = category_filtered_metrics(q, g, ql, gl, query_categories=["a"] * 30, gallery_categories=["a"] * 50)
    plain, _ = _loop_reference(q, g, ql, gl, ["a"] * 30, ["a"] * 50, [1])
    assert abs(same["map"] - plain) < 1e-6 and same["same_category_gallery_share"] == 1.0
