"""``capret-eval`` feature and official-protocol modes, called through ``capret.cli.eval.main``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capret.cli.eval import main
from capret.evaluation import metrics as M


def _features(tmp_path: Path, *, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, 8))
    ql, gl = rng.integers(0, 6, 20), np.repeat(np.arange(6), 4)
    q = centres[ql] + 0.8 * rng.standard_normal((20, 8))
    g = centres[gl] + 0.8 * rng.standard_normal((24, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    paths = {}
    for name, arr in (("q", q.astype(np.float32)), ("g", g.astype(np.float32)), ("ql", ql), ("gl", gl)):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], arr)
    return paths


def _json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out)


def _feature_argv(p: dict[str, Path]) -> list[str]:
    return [
        "--metric",
        "map",
        "--query-features",
        str(p["q"]),
        "--gallery-features",
        str(p["g"]),
        "--query-labels",
        str(p["ql"]),
        "--gallery-labels",
        str(p["gl"]),
    ]


def test_features_mode_matches_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _features(tmp_path)
    assert main(_feature_argv(p) + ["--ks", "1", "5"]) == 0
    out = _json(capsys)
    q, g = np.load(p["q"]), np.load(p["g"])
    rel = np.load(p["ql"])[:, None] == np.load(p["gl"])[None, :]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert out["map"] == pytest.approx(M.mean_average_precision(q @ g.T, rel))
        rec = M.recall_at_k(q @ g.T, rel, [1, 5])
    assert out["recall@1"] == pytest.approx(rec[1]) and out["recall@5"] == pytest.approx(rec[5])
    assert out["num_queries"] == 20 and out["index"] == "exact"


def test_features_mode_flat_index_and_out_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _features(tmp_path, seed=1)
    # image lists: one picture per item, gallery entries with a crop box
    for side, n in (("query", 20), ("gallery", 24)):
        lines = []
        for i in range(n):
            path = tmp_path / f"{side}{i}.png"
            Image.new("RGB", (40, 30), ((i * 37) % 255, 90, 160)).save(path)
            lines.append(path.name + ("  2 2 30 25" if side == "gallery" else ""))
        (tmp_path / f"{side}.txt").write_text("\n".join(lines) + "\n")
    argv = _feature_argv(p) + [
        "--index",
        "flat",
        "--query-images",
        str(tmp_path / "query.txt"),
        "--gallery-images",
        str(tmp_path / "gallery.txt"),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    out = _json(capsys)
    assert out["index"] == "flat"
    assert out["map_depth"] == 20  # truncated AP at max(ks) with an index other than exact
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["recall@10"] == out["recall@10"]
    for key in ("grid_png", "recall_png"):
        assert Path(out[key]).is_file() and Path(out[key]).stat().st_size > 1000
    # exact and flat agree on R@k (same similarity, exact search in both)
    assert main(_feature_argv(p)) == 0
    exact = _json(capsys)
    for k in (1, 5, 10, 20):
        assert exact[f"recall@{k}"] == pytest.approx(out[f"recall@{k}"])


def test_features_mode_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _features(tmp_path)
    argv = _feature_argv(p)
    assert main(argv[: argv.index("--query-labels")]) == 2
    assert "--query-labels" in capsys.readouterr().err
    np.save(tmp_path / "short.npy", np.zeros(3, dtype=np.int64))
    bad = list(argv)
    bad[bad.index(str(p["ql"]))] = str(tmp_path / "short.npy")
    assert main(bad) == 2
    assert "query_labels has 3 entries" in capsys.readouterr().err
    bad[bad.index(str(tmp_path / "short.npy"))] = str(tmp_path / "missing.npy")
    assert main(bad) == 2
    assert "missing.npy" in capsys.readouterr().err


def test_features_mode_rerank_before_after(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _features(tmp_path, seed=2)
    assert (
        main(_feature_argv(p) + ["--rerank", "aqe", "--rerank-topk", "10", "--out", str(tmp_path / "o")]) == 0
    )
    out = _json(capsys)
    assert set(out["before"]) == set(out["after"]) and out["rerank_topk"] == 10
    assert out["rerank_seconds"] >= 0
    assert Path(out["recall_png"]).is_file()


def _official_files(tmp_path: Path) -> list[str]:
    query_gt = [
        {"query_image_id": 1, "bbox": [0, 0, 10, 10], "cls": 1, "style": 1, "pair_id": 5},
        {"query_image_id": 2, "bbox": [0, 0, 10, 10], "cls": 2, "style": 1, "pair_id": 6},
    ]
    gallery_gt = [
        {"gallery_image_id": 10, "bbox": [0, 0, 10, 10], "style": 1, "pair_id": 5},
        {"gallery_image_id": 11, "bbox": [0, 0, 10, 10], "style": 1, "pair_id": 6},
        {
            "gallery_image_id": 12,
            "bbox": [0, 0, 10, 10],
            "style": 1,
            "pair_id": 7,
        },  # a results id must be a gallery image
    ]
    ids = [11, 10] + [12] * 18
    results = [
        {
            "query_image_id": 1,
            "query_bbox": [0, 0, 10, 10],
            "query_score": 0.9,
            "query_cls": 1,
            "gallery_image_id": ids,
            "gallery_bbox": [[0, 0, 10, 10]] * 20,
        },
    ]
    paths = []
    for name, obj in (("r", results), ("q", query_gt), ("g", gallery_gt)):
        (tmp_path / f"{name}.json").write_text(json.dumps(obj))
        paths.append(str(tmp_path / f"{name}.json"))
    return paths


def test_official_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r, q, g = _official_files(tmp_path)
    argv = ["--protocol", "deepfashion2", "--results", r, "--query-gt", q, "--gallery-gt", g]
    assert main(argv + ["--out", str(tmp_path / "o")]) == 0
    out = _json(capsys)
    assert out["top1"] == 0.0 and out["top5"] == 0.5 and out["top15"] == 0.5
    assert out["num_queries"] == 2 and out["missed"] == 1
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["top20"] == 0.5
    assert Path(out["recall_png"]).is_file()
    assert main(argv + ["--ks", "1", "2"]) == 0
    assert set(k for k in _json(capsys) if k.startswith("top")) == {"top1", "top2"}
    assert main(argv + ["--ks", "1", "30"]) == 2
    assert "results record 0" in capsys.readouterr().err
    assert main(["--protocol", "deepfashion2", "--results", r]) == 2
    assert "--query-gt" in capsys.readouterr().err
