"""``capret-eval --dataset cirr|fashioniq --rerank NAME``: metrics before and after reranking a CIR ranking.

The "after" metrics are checked against a ranking rebuilt here the slow, obvious way: the full gallery sorted by
composed-query similarity (reference removed for CIRR), its head reordered by the reranker called directly,
then scored by the official metric functions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from repo_paths import CONFIGS as REPO_CONFIGS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_cir import make_tiny_clip, write_cirr, write_fashioniq  # noqa: E402

from capret.cli import eval as eval_cli  # noqa: E402
from capret.cli import train as train_cli  # noqa: E402

CONFIGS = REPO_CONFIGS
QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.amp='off'", "trainer.num_workers=0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny CIRR and FashionIQ folders and a one-step stage-1 checkpoint (evaluated on both benchmarks)."""
    base = tmp_path_factory.mktemp("cir_rerank")
    clip = make_tiny_clip(base / "clip")
    cirr = write_cirr(base / "cirr")
    out = base / "run"
    argv = [
        "--config",
        str(CONFIGS / "cirr_combiner.yaml"),
        f"data.root={cirr}",
        f"model.clip.name={clip}",
        f"trainer.output_dir={out}",
        "stage=1",
        "stage1.batch_size=10",
        "stage1.epochs=1",
        "data.feature_cache=null",
        *QUIET,
    ]
    assert train_cli.main(argv) == 0
    return {
        "cirr": cirr,
        "fiq": write_fashioniq(base / "fiq", categories=("dress", "shirt", "toptee")),
        "ckpt": out / "stage1" / "best",
    }


def _eval(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    code = eval_cli.main([*argv, "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _full_reranked(
    ckpt: Path, ds, *, exclude_reference: bool, reranker: str, topk: int, must_change: bool = True
) -> list[list[str]]:
    """Whole-gallery ranking per query, its top ``topk`` reordered by ``reranker``."""
    from capret.inference.cir.combiner import load_cir_model
    from capret.inference.cir.search import rank_cir_queries
    from capret.retrieval.rerank import create_reranker

    clip, fuser, _ = load_cir_model(ckpt)
    refs = [t.reference for t in ds.triplets]
    feats = rank_cir_queries(
        clip,
        fuser,
        references=refs,
        captions=[t.caption for t in ds.triplets],
        gallery=ds.gallery,
        load_image=ds.load_image,
        k=1,
    )
    names = feats.gallery.names
    sims = (feats.queries @ feats.gallery.features.T).numpy()
    full = []
    for row, ref in zip(sims, refs):
        order = [int(i) for i in np.argsort(-row, kind="stable")]
        full.append([i for i in order if not (exclude_reference and names[i] == ref)])
    k_r = min(topk, min(len(r) for r in full))
    head = np.array([r[:k_r] for r in full])
    head_scores = np.take_along_axis(sims, head, 1)
    new, _ = create_reranker(reranker).rerank(
        ranking=head,
        scores=head_scores,
        query_features=feats.queries.numpy(),
        gallery_features=feats.gallery.features.numpy(),
    )
    assert not must_change or not np.array_equal(new, head), (
        "the reranker should change some order for the test to bite"
    )
    return [[names[i] for i in list(h) + r[k_r:]] for h, r in zip(new.tolist(), full)]


def test_cirr_aqe_before_after_match_a_direct_rerank(world, tmp_path, capsys):
    from capret.data.cirr import CIRR
    from capret.evaluation.cir import cirr_metrics

    base = ["--dataset", "cirr", "--checkpoint", str(world["ckpt"]), "--root", str(world["cirr"])]
    plain = _eval([*base, "--split", "val", "--out", str(tmp_path / "plain")], capsys)
    out = _eval(
        [*base, "--split", "val", "--rerank", "aqe", "--rerank-topk", "60", "--out", str(tmp_path / "aqe")],
        capsys,
    )
    metrics = out["metrics"]
    assert set(metrics) == {"before", "after", "rerank", "rerank_topk", "rerank_seconds"}
    assert metrics["rerank"] == "aqe" and metrics["rerank_topk"] == 60 and metrics["rerank_seconds"] >= 0
    assert metrics["before"] == pytest.approx(plain["metrics"])

    ds = CIRR(world["cirr"], "val")
    direct = _full_reranked(world["ckpt"], ds, exclude_reference=True, reranker="aqe", topk=60)
    expected = cirr_metrics({t.query_id: r for t, r in zip(ds.triplets, direct)}, ds.annotations)
    expected["r5_rs1_mean"] = (expected["recall@5"] + expected["recall_subset@1"]) / 2
    assert metrics["after"] == pytest.approx(expected)

    # test split: the server file is the reranked top 50 (test1 holds the val triplets without targets)
    test = _eval(
        [*base, "--split", "test", "--rerank", "aqe", "--rerank-topk", "60", "--out", str(tmp_path / "t")],
        capsys,
    )
    assert test["metrics"]["before"] == {} and test["metrics"]["after"] == {}
    recall = json.loads((tmp_path / "t" / "cirr_recall_test1.json").read_text())
    for t, ranking in zip(ds.triplets, direct):
        assert recall[str(t.query_id)] == ranking[:50]


def test_fashioniq_aqe_before_after_match_a_direct_rerank(world, tmp_path, capsys):
    from capret.data.fashioniq import FashionIQ
    from capret.evaluation.cir import fashioniq_recall

    base = ["--dataset", "fashioniq", "--checkpoint", str(world["ckpt"]), "--root", str(world["fiq"])]
    out = _eval([*base, "--split", "val", "--rerank", "aqe", "--out", str(tmp_path / "aqe")], capsys)
    metrics = out["metrics"]
    assert set(metrics["before"]) == set(metrics["after"]) >= {"dress/recall@10", "average"}
    datasets = [FashionIQ(world["fiq"], c, "val") for c in ("dress", "shirt", "toptee")]
    assert metrics["rerank_topk"] == min(len(ds.gallery) for ds in datasets)  # default 100, capped
    direct = {
        ds.category: _full_reranked(world["ckpt"], ds, exclude_reference=False, reranker="aqe", topk=100)
        for ds in datasets
    }
    expected = fashioniq_recall(direct, {ds.category: ds.annotations for ds in datasets})
    assert metrics["after"] == pytest.approx(expected)
    saved = json.loads((tmp_path / "aqe" / "metrics.json").read_text())
    assert saved["metrics"]["after"] == pytest.approx(expected)


def test_cirr_kreciprocal_runs_and_keeps_the_protocol(world, tmp_path, capsys):
    from capret.data.cirr import CIRR
    from capret.evaluation.cir import cirr_metrics

    base = ["--dataset", "cirr", "--checkpoint", str(world["ckpt"]), "--root", str(world["cirr"])]
    argv = [*base, "--split", "val", "--rerank", "kreciprocal", "--rerank-topk", "50"]
    metrics = _eval([*argv, "--out", str(tmp_path / "kr")], capsys)["metrics"]
    assert metrics["rerank"] == "kreciprocal" and metrics["rerank_topk"] == 50
    # the reranker only permutes the top 50, so R@50 cannot move
    assert metrics["after"]["recall@50"] == metrics["before"]["recall@50"]
    ds = CIRR(world["cirr"], "val")
    # (composed queries of a one-step model sit apart from the targets: k-reciprocal may keep the order here)
    direct = _full_reranked(
        world["ckpt"], ds, exclude_reference=True, reranker="kreciprocal", topk=50, must_change=False
    )
    expected = cirr_metrics({t.query_id: r for t, r in zip(ds.triplets, direct)}, ds.annotations)
    assert {k: metrics["after"][k] for k in expected} == pytest.approx(expected)


def test_bad_rerank_topk_is_refused(world, tmp_path, capsys):
    argv = ["--dataset", "cirr", "--checkpoint", str(world["ckpt"]), "--root", str(world["cirr"])]
    with pytest.raises(SystemExit) as refused:  # argparse's own range check
        eval_cli.main([*argv, "--rerank", "aqe", "--rerank-topk", "0", "--out", str(tmp_path / "x")])
    assert refused.value.code == 2
    assert "--rerank-topk" in capsys.readouterr().err


def test_cirr_geometric_reads_reference_and_gallery_images(world, tmp_path, capsys):
    """Geometric verification opens the reference and candidate images (large enough for SIFT's pyramid)."""
    from tiny_cir import write_image

    root = tmp_path / "cirr"
    shutil.copytree(world["cirr"], root)
    for path in (root / "dev").glob("*.png"):
        write_image(path, path.stem, size=(96, 96))
    base = ["--dataset", "cirr", "--checkpoint", str(world["ckpt"]), "--root", str(root)]
    argv = [*base, "--split", "val", "--rerank", "geometric", "--rerank-topk", "5"]
    metrics = _eval([*argv, "--out", str(tmp_path / "geo")], capsys)["metrics"]
    assert metrics["rerank"] == "geometric" and metrics["rerank_topk"] == 5
    assert metrics["after"]["recall@5"] == metrics["before"]["recall@5"]  # only the top 5 is permuted
