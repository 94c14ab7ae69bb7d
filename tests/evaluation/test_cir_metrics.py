"""CIR metrics and writers against plain reference loops, hand-computed examples and the official formats."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_paths import SHARED_DATA

from capret.evaluation.cir import (
    circo_metrics,
    cirr_metrics,
    cirr_subset_ranking,
    fashioniq_recall,
    rank_gallery,
    write_circo_submission,
    write_cirr_submission,
)

DATA = SHARED_DATA
CIRCO_VAL = DATA / "circo" / "annotations" / "val.json"
CIRR_VAL = DATA / "cirr" / "captions" / "cap.rc2.val.json"
CIRR_SPLIT = DATA / "cirr" / "image_splits" / "split.rc2.val.json"


# ------------------------------------------------------------------------------------------- references
def circo_reference(predictions: dict, annotations: list, ks: tuple[int, ...]) -> dict[str, float]:
    """The official CIRCO formulas written as plain loops."""
    aps: dict[int, list[float]] = {k: [] for k in ks}
    recalls: dict[int, list[float]] = {k: [] for k in ks}
    for record in annotations:
        ranking = predictions[record["id"]]
        gt = record["gt_img_ids"]
        for k in ks:
            total, found = 0.0, 0
            for i, image in enumerate(ranking[:k], start=1):
                if image in gt:
                    found += 1
                    total += found / i
            aps[k].append(total / min(len(gt), k))
            recalls[k].append(1.0 if record["target_img_id"] in ranking[:k] else 0.0)
    out = {f"map@{k}": sum(aps[k]) / len(aps[k]) for k in ks}
    out.update({f"recall@{k}": sum(recalls[k]) / len(recalls[k]) for k in ks})
    return out


def cirr_reference(rankings: dict, annotations: list, ks, subset_ks) -> dict[str, float]:
    """CLIP4Cir-style: mask the reference out of a [Q, G] name matrix, then compare with targets."""
    names = np.array([rankings[r["pairid"]] for r in annotations])
    refs = np.array([r["reference"] for r in annotations])
    keep = names != refs[:, None]
    cleaned = names[keep].reshape(names.shape[0], -1)  # every ranking holds its reference exactly once
    targets = np.array([r["target_hard"] for r in annotations])
    labels = cleaned == targets[:, None]
    out = {f"recall@{k}": float(labels[:, :k].any(1).mean()) for k in ks}
    members = np.array([r["img_set"]["members"] for r in annotations])
    group_mask = (cleaned[..., None] == members[:, None, :]).any(-1)
    group_labels = labels[group_mask].reshape(labels.shape[0], -1)  # 5 members per query after removal
    out.update({f"recall_subset@{k}": float(group_labels[:, :k].any(1).mean()) for k in subset_ks})
    return out


# ------------------------------------------------------------------------------------------- CIRCO
def _circo_predictions(annotations: list, *, seed: int, length: int = 60) -> dict[int, list[int]]:
    rng = random.Random(seed)
    out = {}
    for record in annotations:
        pool = list(dict.fromkeys(record["gt_img_ids"] + [rng.randrange(1, 10**6) for _ in range(length)]))
        pool = [x for x in pool if x not in record["gt_img_ids"]][: length - len(record["gt_img_ids"])]
        pool += record["gt_img_ids"]
        rng.shuffle(pool)
        out[record["id"]] = pool
    return out


def test_circo_matches_reference_loop_on_real_annotations() -> None:
    annotations = json.loads(CIRCO_VAL.read_text())
    ks = (5, 10, 25, 50)
    for seed in range(3):
        predictions = _circo_predictions(annotations, seed=seed)
        got = circo_metrics(predictions, CIRCO_VAL, ks=ks)
        expected = circo_reference(predictions, annotations, ks)
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    by_aspect = circo_metrics(predictions, annotations, ks=(5,), semantic_aspects=True)
    aspects = {a for r in annotations for a in r["semantic_aspects"]}
    assert {k for k in by_aspect if k.startswith("aspect/")} == {f"aspect/{a}/map@10" for a in aspects}
    for aspect in aspects:
        chosen = [r for r in annotations if aspect in r["semantic_aspects"]]
        expected_ap10 = circo_reference(predictions, chosen, (10,))["map@10"]
        assert by_aspect[f"aspect/{aspect}/map@10"] == pytest.approx(expected_ap10, abs=1e-12), aspect
    # Perfect predictions: every GT first -> mAP 1 and recall 1 at every k.
    perfect = {r["id"]: r["gt_img_ids"] + [10**7 + i for i in range(50)] for r in annotations}
    assert set(circo_metrics(perfect, annotations).values()) == {1.0}


def test_circo_known_example_and_key_types() -> None:
    annotations = [{"id": 0, "target_img_id": 1, "gt_img_ids": [1, 2, 3]}]
    ranking = [9, 1, 8, 2, 7, 3]
    got = circo_metrics({"0": [str(x) for x in ranking]}, annotations, ks=(1, 2, 5, 6))
    assert got["map@1"] == 0.0
    assert got["map@2"] == pytest.approx((1 / 2) / 2)
    assert got["map@5"] == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert got["map@6"] == pytest.approx((1 / 2 + 2 / 4 + 3 / 6) / 3)
    assert (got["recall@1"], got["recall@2"]) == (0.0, 1.0)


def test_circo_errors() -> None:
    annotations = [
        {"id": 0, "target_img_id": 1, "gt_img_ids": [1]},
        {"id": 1, "target_img_id": 2, "gt_img_ids": [2]},
    ]
    good = list(range(1, 60))
    with pytest.raises(ValueError, match="image 5 appears more than once"):
        circo_metrics({0: [5, 5] + good[:50], 1: good}, annotations)
    with pytest.raises(ValueError, match=r"query 1: ranking has 49 entries \(k=50\), need at least 50"):
        circo_metrics({0: good, 1: good[:49]}, annotations)
    with pytest.raises(ValueError, match=r"no ranking for 1 annotated queries, e\.g\. \[1\]"):
        circo_metrics({0: good}, annotations)
    with pytest.raises(ValueError, match="not in the annotations"):
        circo_metrics({0: good, 1: good, 7: good}, annotations)
    with pytest.raises(ValueError, match="test split"):
        circo_metrics({0: good}, [{"id": 0, "reference_img_id": 3}])


def test_write_circo_submission(tmp_path: Path) -> None:
    annotations = json.loads(CIRCO_VAL.read_text())
    predictions = _circo_predictions(annotations, seed=1)
    path = write_circo_submission(tmp_path / "sub" / "circo.json", predictions, annotations=CIRCO_VAL)
    data = json.loads(path.read_text())
    assert list(data) == [str(r["id"]) for r in annotations]
    assert all(len(v) == 50 and all(isinstance(x, int) for x in v) for v in data.values())
    assert data["0"] == predictions[0][:50]
    with pytest.raises(ValueError, match="no ranking"):
        write_circo_submission(tmp_path / "x.json", {0: predictions[0]}, annotations=annotations)
    with pytest.raises(ValueError, match="need at least 50"):
        write_circo_submission(tmp_path / "x.json", {0: predictions[0][:10]})


# ------------------------------------------------------------------------------------------- CIRR
def _cirr_rankings(annotations: list, gallery: list[str], *, seed: int) -> dict[int, list[str]]:
    rng = np.random.default_rng(seed)
    names = np.array(gallery)
    return {r["pairid"]: names[rng.permutation(len(names))].tolist() for r in annotations}


def test_cirr_matches_reference_on_real_annotations() -> None:
    annotations = json.loads(CIRR_VAL.read_text())[:400]
    gallery = list(json.loads(CIRR_SPLIT.read_text()))
    for seed in range(2):
        rankings = _cirr_rankings(annotations, gallery, seed=seed)
        # Random full rankings give tiny recalls; move the target up for half of the queries.
        for i, r in enumerate(annotations[::2]):
            ranking = rankings[r["pairid"]]
            ranking.remove(r["target_hard"])
            ranking.insert(i % 60, r["target_hard"])
        got = cirr_metrics(rankings, annotations)
        expected = cirr_reference(rankings, annotations, (1, 5, 10, 50), (1, 2, 3))
        assert got == pytest.approx(expected, abs=1e-12)
        assert 0.0 < got["recall@10"] < got["recall@50"] < 1.0


def test_cirr_known_example_reference_removed() -> None:
    annotations = [
        {"pairid": 7, "reference": "r", "target_hard": "t", "img_set": {"members": ["a", "r", "t", "b"]}},
    ]
    ranking = ["r", "x", "a", "t", "b"] + [f"g{i}" for i in range(50)]
    got = cirr_metrics({"7": ranking}, annotations, ks=(1, 2, 3), subset_ks=(1, 2, 3))
    # reference removed: [x, a, t, ...] -> target at rank 3; subset [a, t, b] -> target at rank 2
    assert got == {
        "recall@1": 0.0,
        "recall@2": 0.0,
        "recall@3": 1.0,
        "recall_subset@1": 0.0,
        "recall_subset@2": 1.0,
        "recall_subset@3": 1.0,
    }
    assert cirr_subset_ranking(ranking, reference="r", members=["a", "r", "t", "b"]) == ["a", "t", "b"]


def test_cirr_errors() -> None:
    annotations = [
        {"pairid": 1, "reference": "r", "target_hard": "t", "img_set": {"members": ["r", "t", "m"]}}
    ]
    long = ["t", "m"] + [f"g{i}" for i in range(60)]
    with pytest.raises(ValueError, match="pairid 1: image 'g3' appears more than once"):
        cirr_metrics({1: long + ["g3"]}, annotations)
    with pytest.raises(ValueError, match="49 entries after removing the reference, need at least 50"):
        cirr_metrics({1: ["r"] + long[:49]}, annotations)
    assert (
        cirr_metrics({1: long[:50]}, annotations)["recall@1"] == 1.0
    )  # 50 names without the reference is enough
    with pytest.raises(ValueError, match=r"lacks img_set members \['m'\]"):
        cirr_metrics({1: ["t"] + [f"g{i}" for i in range(60)]}, annotations)
    assert cirr_metrics({1: ["t"] + [f"g{i}" for i in range(60)]}, annotations, subset_ks=()) == {
        "recall@1": 1.0,
        "recall@5": 1.0,
        "recall@10": 1.0,
        "recall@50": 1.0,
    }
    with pytest.raises(ValueError, match="target_hard"):
        cirr_metrics({1: long}, [{"pairid": 1, "reference": "r", "img_set": {"members": []}}])


def test_write_cirr_submissions(tmp_path: Path) -> None:
    annotations = json.loads(CIRR_VAL.read_text())[:50]
    test_like = [{k: v for k, v in r.items() if k not in ("target_hard", "target_soft")} for r in annotations]
    gallery = list(json.loads(CIRR_SPLIT.read_text()))
    rankings = _cirr_rankings(annotations, gallery, seed=5)
    recall = json.loads(write_cirr_submission(tmp_path / "recall.json", rankings, test_like).read_text())
    assert (recall["version"], recall["metric"]) == ("rc2", "recall")
    assert len(recall) == 2 + len(annotations)
    for r in annotations:
        top = recall[str(r["pairid"])]
        expected = [n for n in rankings[r["pairid"]] if n != r["reference"]][:50]
        assert top == expected and r["reference"] not in top
    subset_path = write_cirr_submission(tmp_path / "subset.json", rankings, test_like, kind="recall_subset")
    subset = json.loads(subset_path.read_text())
    assert subset["metric"] == "recall_subset"
    for r in annotations:
        top3 = subset[str(r["pairid"])]
        members = set(r["img_set"]["members"]) - {r["reference"]}
        order = [n for n in rankings[r["pairid"]] if n in members]
        assert top3 == order[:3] and len(top3) == 3
    with pytest.raises(ValueError, match="recall_subset"):
        write_cirr_submission(tmp_path / "bad.json", rankings, test_like, kind="top3")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- FashionIQ
def test_fashioniq_recall_matches_loop_and_averages() -> None:
    rng = random.Random(0)
    annotations = {}
    rankings = {}
    for category in ("dress", "shirt", "toptee"):
        annotations[category] = json.loads(
            (DATA / "fashioniq" / "captions" / f"cap.{category}.val.json").read_text()
        )
        gallery = json.loads((DATA / "fashioniq" / "image_splits" / f"split.{category}.val.json").read_text())
        per = []
        for record in annotations[category]:
            ranking = rng.sample(gallery, 60)
            if record["target"] in ranking:
                ranking.remove(record["target"])
            ranking.insert(rng.randrange(0, 80), record["target"])  # beyond 60 -> appended at the end
            per.append(ranking[:60])
        rankings[category] = per
    got = fashioniq_recall(rankings, annotations)
    for category in annotations:
        for k in (10, 50):
            hits = [r["target"] in rk[:k] for r, rk in zip(annotations[category], rankings[category])]
            assert got[f"{category}/recall@{k}"] == pytest.approx(sum(hits) / len(hits))
    for k in (10, 50):
        assert got[f"average/recall@{k}"] == pytest.approx(
            (got[f"dress/recall@{k}"] + got[f"shirt/recall@{k}"] + got[f"toptee/recall@{k}"]) / 3
        )
    assert got["average"] == pytest.approx((got["average/recall@10"] + got["average/recall@50"]) / 2)
    as_mapping = {c: dict(enumerate(r)) for c, r in rankings.items()}
    paths = {c: DATA / "fashioniq" / "captions" / f"cap.{c}.val.json" for c in annotations}
    assert fashioniq_recall(as_mapping, paths) == got


def test_fashioniq_known_example_and_errors() -> None:
    annotations = {"dress": [{"candidate": "c", "target": "t", "captions": ["a", "b"]}]}
    got = fashioniq_recall({"dress": [["c", "x", "t"]]}, annotations, ks=(1, 2, 3))
    # The reference "c" is NOT removed for FashionIQ: target at rank 3.
    assert got == {
        "dress/recall@1": 0.0,
        "dress/recall@2": 0.0,
        "dress/recall@3": 1.0,
        "average/recall@1": 0.0,
        "average/recall@2": 0.0,
        "average/recall@3": 1.0,
        "average": pytest.approx(1 / 3),
    }
    with pytest.raises(ValueError, match="appears more than once"):
        fashioniq_recall({"dress": [["t", "t", "x"]]}, annotations, ks=(3,))
    with pytest.raises(ValueError, match="ranking has 1 entries, need at least 50"):
        fashioniq_recall({"dress": [["t"]]}, annotations)
    with pytest.raises(ValueError, match="2 rankings for 1 annotated"):
        fashioniq_recall({"dress": [["t"], ["t"]]}, annotations, ks=(1,))
    with pytest.raises(ValueError, match="categories"):
        fashioniq_recall({"shirt": [["t"]]}, annotations, ks=(1,))


def test_fashioniq_whole_small_gallery_is_a_complete_ranking() -> None:
    """A gallery under max(ks) ranked whole scores R@50 (the rendered world's galleries hold 10-25 images);
    a ranking shorter than its gallery is still refused as truncated."""
    annotations = {"dress": [{"candidate": "c", "target": "t", "captions": ["a", "b"]}] * 2}
    whole = [["c", "x", "t"], ["t", "c", "x"]]
    got = fashioniq_recall({"dress": whole}, annotations, gallery_sizes={"dress": 3})
    assert got["dress/recall@10"] == got["dress/recall@50"] == 1.0
    assert fashioniq_recall({"dress": whole}, annotations, ks=(1,), gallery_sizes={"dress": 3}) == {
        "dress/recall@1": 0.5, "average/recall@1": 0.5, "average": 0.5,
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"ranking has 2 entries \(gallery of 3\), need at least 3"):
        fashioniq_recall({"dress": [["c", "x"], ["t", "c"]]}, annotations, gallery_sizes={"dress": 3})
    with pytest.raises(ValueError, match="need at least 50"):
        fashioniq_recall({"dress": whole}, annotations)


# ------------------------------------------------------------------------------------------- rank_gallery
def _full_rank_reference(q: torch.Tensor, g: torch.Tensor, names: list, exclude, top_n) -> list[list]:
    out = []
    for i in range(q.shape[0]):
        order = torch.argsort(g @ q[i], descending=True).tolist()
        ranked = [names[j] for j in order if exclude is None or names[j] != exclude[i]]
        out.append(ranked if top_n is None else ranked[:top_n])
    return out


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("top_n", [5, 30, None])
def test_rank_gallery_matches_full_sort(chunk_size: int, top_n: int | None) -> None:
    gen = torch.Generator().manual_seed(chunk_size)
    q = torch.nn.functional.normalize(torch.randn(23, 16, generator=gen), dim=1)
    g = torch.nn.functional.normalize(torch.randn(30, 16, generator=gen), dim=1)
    names = [f"img{i}" for i in range(30)]
    exclude = [names[i % 30] if i % 3 else "not-in-gallery" for i in range(23)]
    got = rank_gallery(q, g, names, top_n=top_n, exclude=exclude, chunk_size=chunk_size)
    assert got == _full_rank_reference(q, g, names, exclude, top_n)
    plain = rank_gallery(q.numpy(), g.numpy(), list(range(30)), top_n=top_n, chunk_size=chunk_size)
    assert plain == [[int(n[3:]) for n in row] for row in _full_rank_reference(q, g, names, None, top_n)]
    for row, ex in zip(got, exclude):
        assert ex not in row
        available = 30 if ex == "not-in-gallery" else 29
        assert len(row) == (available if top_n is None else min(top_n, available))


def test_rank_gallery_feeds_cirr_metrics() -> None:
    """The reference scores highest, the target second: removing the reference puts the target first."""
    g = torch.eye(60)
    names = [f"n{i}" for i in range(60)]
    annotations = [
        {
            "pairid": i,
            "reference": names[i + 1],
            "target_hard": names[i],
            "img_set": {"members": names[i : i + 4]},
        }
        for i in range(10)
    ]
    q = g[:10] + 2.0 * g[1:11]  # score 2 for the reference, 1 for the target, 0 for the rest
    rankings = rank_gallery(q, g, names, top_n=None, exclude=[a["reference"] for a in annotations])
    metrics = cirr_metrics(dict(enumerate(rankings)), annotations)
    assert metrics["recall@1"] == 1.0 and metrics["recall_subset@1"] == 1.0
    kept = rank_gallery(q, g, names, top_n=None)
    assert all(row[0] == a["reference"] for row, a in zip(kept, annotations))


def test_rank_gallery_errors() -> None:
    q, g = torch.zeros(2, 4), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="unique"):
        rank_gallery(q, g, ["a", "a", "b"])
    with pytest.raises(ValueError, match="2 gallery names for 3"):
        rank_gallery(q, g, ["a", "b"])
    with pytest.raises(ValueError, match=r"\[Q, D\]"):
        rank_gallery(q, torch.zeros(3, 5), ["a", "b", "c"])
