"""``capret-eval --method ...`` on tiny FashionIQ / CIRR / CIRCO layouts, and the shortcut baselines.

The baselines reported beside every method are checked against rankings built here the slow, obvious way: each
image and caption encoded one at a time, the whole gallery sorted per query (CIRR: reference dropped), scored by
the official metric functions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_cir import make_tiny_clip, write_circo, write_cirr, write_fashioniq  # noqa: E402

from capret.cli import eval as eval_cli  # noqa: E402
from capret.evaluation.cir import circo_metrics, cirr_metrics, fashioniq_recall  # noqa: E402

#: methods that run without trained weights (the mapper methods are tested with their checkpoints)
FREE_METHODS = ("image-only", "text-only", "sum", "cirevl")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("cir_methods")
    circo, ids = write_circo(base / "circo")
    return {
        "clip": make_tiny_clip(base / "clip"),
        "cirr": write_cirr(base / "cirr"),
        "fashioniq": write_fashioniq(base / "fiq", categories=("dress", "shirt", "toptee")),
        "circo": circo,
        "base": base,
    }


def _eval(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    code = eval_cli.main([*argv, "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


class _Slow:
    """One image or caption at a time through the public encoders, each image encoded once."""

    def __init__(self, clip: Any) -> None:
        self.clip = clip
        self.images: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def image(self, name: str, load: Any) -> torch.Tensor:
        if name not in self.images:
            self.images[name] = self.clip.encode_image(self.clip.transform(load(name)).unsqueeze(0))[0]
        return self.images[name]

    @torch.no_grad()
    def queries(self, refs: list[str], captions: list[str], load: Any) -> dict[str, torch.Tensor]:
        image = torch.stack([self.image(r, load) for r in refs])
        text = torch.cat([self.clip.encode_text([c]) for c in captions])
        return {"image-only": image, "text-only": text, "sum": F.normalize(image + text, dim=-1)}

    def rankings(self, queries: torch.Tensor, gallery: list[str], load: Any) -> list[list[str]]:
        feats = torch.stack([self.image(g, load) for g in gallery])
        out = []
        for q in queries:
            scores = (feats @ q).tolist()
            out.append([gallery[i] for i in sorted(range(len(gallery)), key=lambda i: -scores[i])])
        return out


def _reference_baselines(world: dict[str, Any], dataset: str) -> dict[str, dict[str, float]]:
    from capret.models.clip import load_clip

    slow = _Slow(load_clip(world["clip"]).eval())
    out: dict[str, dict[str, float]] = {}
    if dataset == "cirr":
        from capret.data.cirr import CIRR

        ds = CIRR(world["cirr"], "val")
        refs = [t.reference for t in ds.triplets]
        queries = slow.queries(refs, [t.caption for t in ds.triplets], ds.load_image)
        for name, q in queries.items():
            full = slow.rankings(q, ds.gallery, ds.load_image)
            rankings = {t.query_id: [n for n in r if n != t.reference] for t, r in zip(ds.triplets, full)}
            out[name] = cirr_metrics(rankings, ds.annotations)
            out[name]["r5_rs1_mean"] = (out[name]["recall@5"] + out[name]["recall_subset@1"]) / 2
        return out
    if dataset == "circo":
        from capret.data.circo import CIRCO

        ids = sorted(
            int(p.stem) for p in (world["circo"] / "COCO2017_unlabeled" / "unlabeled2017").glob("*.jpg")
        )
        ds = CIRCO(world["circo"], "val", gallery_ids=ids)
        load = lambda name: ds.load_image(int(name))  # noqa: E731
        refs = [str(q.reference) for q in ds.queries]
        queries = slow.queries(refs, [q.caption for q in ds.queries], load)
        for name, q in queries.items():
            full = slow.rankings(q, [str(g) for g in ds.gallery], load)
            rankings = {query.query_id: [int(n) for n in r] for query, r in zip(ds.queries, full)}
            out[name] = circo_metrics(rankings, ds.annotations)
        return out
    from capret.data.fashioniq import FashionIQ

    per_name: dict[str, dict[str, list[list[str]]]] = {}
    annotations = {}
    for category in ("dress", "shirt", "toptee"):
        ds = FashionIQ(world["fashioniq"], category, "val")
        annotations[category] = ds.annotations
        refs = [t.reference for t in ds.triplets]
        queries = slow.queries(refs, [t.caption for t in ds.triplets], ds.load_image)
        for name, q in queries.items():
            per_name.setdefault(name, {})[category] = slow.rankings(q, ds.gallery, ds.load_image)
    return {name: fashioniq_recall(r, annotations) for name, r in per_name.items()}


@pytest.mark.parametrize("dataset", ["cirr", "fashioniq", "circo"])
def test_baselines_match_slow_reference(world, dataset, tmp_path, capsys) -> None:
    argv = [
        "--dataset",
        dataset,
        "--method",
        "sum",
        "--root",
        str(world[dataset]),
        "--clip",
        str(world["clip"]),
    ]
    out = _eval([*argv, "--out", str(tmp_path)], capsys)
    expected = _reference_baselines(world, dataset)
    assert set(out["baselines"]) == set(expected) == {"image-only", "text-only", "sum"}
    for name, metrics in expected.items():
        assert out["baselines"][name] == pytest.approx(metrics, abs=1e-9), name
    assert out["metrics"] == out["baselines"]["sum"]  # the method itself is the sum baseline
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["baselines"] == out["baselines"] and saved["gallery"] == out["gallery"]


@pytest.mark.parametrize("dataset", ["cirr", "fashioniq", "circo"])
@pytest.mark.parametrize("method", FREE_METHODS)
def test_each_method_runs_through_capret_eval(world, dataset, method, capsys) -> None:
    out_dir = world["base"] / "runs" / f"{dataset}_{method}"
    argv = [
        "--dataset",
        dataset,
        "--method",
        method,
        "--root",
        str(world[dataset]),
        "--clip",
        str(world["clip"]),
    ]
    out = _eval([*argv, "--out", str(out_dir)], capsys)
    assert out["method"] == method and out["dataset"] == dataset and out["split"] == "val"
    keys = {
        "cirr": {"recall@1", "recall@5", "recall@10", "recall@50", "recall_subset@1", "r5_rs1_mean"},
        "circo": {"map@5", "map@10", "map@25", "map@50", "recall@5"},
        "fashioniq": {"dress/recall@10", "toptee/recall@50", "average/recall@10", "average"},
    }[dataset]
    assert keys <= set(out["metrics"]) and all(0.0 <= v <= 1.0 for v in out["metrics"].values())
    assert set(out["baselines"]) == {"image-only", "text-only", "sum"}
    if method != "cirevl":
        assert out["metrics"] == out["baselines"][method]
    assert out["gallery"]["reference_removed"] is (dataset == "cirr")


def test_test_splits_write_server_files_with_rerank(world, tmp_path, capsys) -> None:
    base = ["--method", "cirevl", "--clip", str(world["clip"]), "--rerank", "aqe", "--rerank-topk", "10"]
    cirr = _eval([*base, "--dataset", "cirr", "--root", str(world["cirr"]), "--split", "test1",
                  "--out", str(tmp_path / "cirr")], capsys)  # fmt: skip
    assert sorted(Path(f).name for f in cirr["files"]) == [
        "cirr_recall_subset_test1.json",
        "cirr_recall_test1.json",
    ]
    assert cirr["baselines"] == {} and cirr["metrics"]["rerank"] == "aqe"
    circo = _eval(["--method", "text-only", "--clip", str(world["clip"]), "--dataset", "circo", "--root",
                   str(world["circo"]), "--split", "test", "--out", str(tmp_path / "circo")], capsys)  # fmt: skip
    submission = json.loads(Path(circo["files"][0]).read_text())
    assert len(submission) == 6 and all(len(v) == 50 for v in submission.values())


def test_method_flag_errors(world, tmp_path, capsys) -> None:
    root = ["--dataset", "cirr", "--root", str(world["cirr"]), "--out", str(tmp_path)]
    assert eval_cli.main([*root, "--method", "sum"]) == 2
    assert "--clip" in capsys.readouterr().err
    assert eval_cli.main([*root, "--method", "combiner"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_cli.main([*root, "--method", "nope"])
    assert "invalid choice" in capsys.readouterr().err
    assert (
        eval_cli.main(["--dataset", "cirr", "--root", str(world["cirr"]), "--method", "sum", "--clip", "x"])
        == 2
    )
    assert "--out" in capsys.readouterr().err
    cirevl = [*root, "--method", "cirevl", "--clip", str(world["clip"]), "--captioner", "openai"]
    assert eval_cli.main(cirevl) == 2
    assert "--vlm" in capsys.readouterr().err
    assert eval_cli.main([*cirevl, "--vlm", "m"]) == 2
    assert "--base-url" in capsys.readouterr().err
