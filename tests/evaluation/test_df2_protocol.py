"""The official DeepFashion2 retrieval protocol against three references, on synthetic and real ground truth.

``official_structure_top_k`` follows the published script's per-query loop (a scan of the whole result list per
query image, a scan of the whole gallery GT per query item, each k walked separately; pycocotools IoU), with
its bugs fixed; ``straightforward_top_k`` is the same algorithm written plainly in Python (dict lookups by image
id, a scalar IoU, explicit loops over items, detections, k and ranks); ``reference_top_k`` is a numpy-grouped
reference that uses pycocotools' own IoU. ``scripts/bench/df2_eval.py`` times the evaluator against all three.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from repo_paths import SHARED_DATA, require_shared_data

from capret.evaluation.deepfashion2 import (
    coco_iou,
    evaluate_gt_boxes,
    evaluate_retrieval_results,
    write_retrieval_results,
)

DATA = SHARED_DATA / "deepfashion2"


def _xywh(box):
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def reference_top_k(
    results, query_gt, gallery_gt, *, ks=(1, 5, 10, 15, 20), thresh=0.5, legacy_singleton_bug=False
):
    """The official algorithm as a straightforward loop over query images and their items (pycocotools IoU)."""
    res_img = np.array([r["query_image_id"] for r in results])
    q_img = np.array([q["query_image_id"] for q in query_gt])
    g_pair = np.array([g["pair_id"] for g in gallery_gt])
    g_style = np.array([g["style"] for g in gallery_gt])
    num_queries = sum(1 for q in query_gt if q["style"] > 0)
    correct = dict.fromkeys(ks, 0)
    evaluated = 0
    for image in np.unique(q_img):
        dets = [results[i] for i in np.nonzero(res_img == image)[0]]
        if not dets:
            continue
        items = [query_gt[i] for i in np.nonzero(q_img == image)[0]]
        iou = mask_utils.iou(
            [_xywh(d["query_bbox"]) for d in dets], [_xywh(q["bbox"]) for q in items], [0] * len(items)
        )
        assigned = np.argmax(iou, axis=1)  # first maximum, no minimum IoU
        for j, item in enumerate(items):
            if item["style"] <= 0:
                continue
            candidates = [d for d, a in zip(dets, assigned) if a == j and d["query_cls"] == item["cls"]]
            if not candidates:
                continue
            evaluated += 1
            best = candidates[0]
            for d in candidates[1:]:
                if d["query_score"] > best["query_score"]:
                    best = d
            same_identity = np.nonzero((g_pair == item["pair_id"]) & (g_style == item["style"]))[0]
            if legacy_singleton_bug and len(same_identity) == 1:
                continue
            first_hit = None
            for t in range(max(ks)):
                boxes = [
                    _xywh(gallery_gt[g]["bbox"])
                    for g in same_identity
                    if gallery_gt[g]["gallery_image_id"] == best["gallery_image_id"][t]
                ]
                if boxes:
                    overlap = mask_utils.iou([_xywh(best["gallery_bbox"][t])], boxes, [0] * len(boxes))
                    if (np.asarray(overlap) >= thresh).any():
                        first_hit = t
                        break
            for k in ks:
                if first_hit is not None and first_hit < k:
                    correct[k] += 1
    out = {f"top{k}": correct[k] / num_queries for k in ks}
    out.update(num_queries=num_queries, evaluated=evaluated, missed=num_queries - evaluated)
    return out


def plain_iou(box_a, box_b):
    """IoU of two xyxy boxes exactly as pycocotools ``bbIou`` computes it (``[x, y, w, h]`` doubles, right edge
    ``x + w``, zero unless both overlaps are positive)."""
    ax, ay = float(box_a[0]), float(box_a[1])
    aw, ah = float(box_a[2]) - ax, float(box_a[3]) - ay
    bx, by = float(box_b[0]), float(box_b[1])
    bw, bh = float(box_b[2]) - bx, float(box_b[3]) - by
    w = min(ax + aw, bx + bw) - max(ax, bx)
    if w <= 0:
        return 0.0
    h = min(ay + ah, by + bh) - max(ay, by)
    if h <= 0:
        return 0.0
    inter = w * h
    return inter / (aw * ah + bw * bh - inter)


def straightforward_top_k(
    results, query_gt, gallery_gt, *, ks=(1, 5, 10, 15, 20), thresh=0.5, legacy_singleton_bug=False
):
    """The official script's algorithm as a plain Python loop (no numpy): the slow, obvious reference.

    Per query image: every detection goes to its argmax-IoU ground-truth item (first on ties, no minimum IoU).
    Per ``style > 0`` item: the best-scoring assigned detection of the item's class (first on ties); then, for
    each k, the top-k retrieved entries are walked and each is compared with every ground-truth gallery box of
    that gallery image (same ``pair_id`` and ``style``, IoU >= ``thresh``). Lookups are dicts keyed by image id.
    """
    detections_of = defaultdict(list)
    for det in results:
        detections_of[det["query_image_id"]].append(det)
    items_of = defaultdict(list)
    for item in query_gt:
        items_of[item["query_image_id"]].append(item)
    gallery_of = defaultdict(list)
    identity_size = Counter()
    for shop in gallery_gt:
        gallery_of[shop["gallery_image_id"]].append(shop)
        identity_size[(shop["pair_id"], shop["style"])] += 1
    num_queries = sum(1 for item in query_gt if item["style"] > 0)
    correct = dict.fromkeys(ks, 0)
    evaluated = 0
    for image, items in items_of.items():
        detections = detections_of.get(image, [])
        assigned = []
        for det in detections:
            best_item, best_iou = 0, -1.0
            for j, item in enumerate(items):
                iou = plain_iou(det["query_bbox"], item["bbox"])
                if iou > best_iou:
                    best_item, best_iou = j, iou
            assigned.append(best_item)
        for j, item in enumerate(items):
            if item["style"] <= 0:
                continue
            best = None
            for det, a in zip(detections, assigned):
                if a != j or det["query_cls"] != item["cls"]:
                    continue
                if best is None or det["query_score"] > best["query_score"]:
                    best = det
            if best is None:
                continue
            evaluated += 1
            if legacy_singleton_bug and identity_size[(item["pair_id"], item["style"])] == 1:
                continue  # the published script never finds a single-item identity's image
            for k in ks:
                found = False
                for t in range(k):
                    for shop in gallery_of.get(best["gallery_image_id"][t], []):
                        if (
                            shop["pair_id"] == item["pair_id"]
                            and shop["style"] == item["style"]
                            and plain_iou(best["gallery_bbox"][t], shop["bbox"]) >= thresh
                        ):
                            found = True
                            break
                    if found:
                        break
                if found:
                    correct[k] += 1
    out = {f"top{k}": correct[k] / num_queries for k in ks}
    out.update(num_queries=num_queries, evaluated=evaluated, missed=num_queries - evaluated)
    return out


def official_structure_top_k(
    results, query_gt, gallery_gt, *, ks=(1, 5, 10, 15, 20), thresh=0.5, legacy_singleton_bug=False
):
    """The published script's per-query loop (``deepfashion2_retrieval_test.py``), in Python 3, its bugs fixed.

    Mirrors the script's structure and data layout, not just its algorithm: every field is gathered into a
    numpy array first (boxes as ``[x, y, w, h]``); then, per query image id (``np.unique`` order), the whole
    result list is scanned for that image's detections, the detections are assigned to the image's items by
    argmax of pycocotools IoU, and per ``style > 0`` item the best-scoring correctly classified detection is
    chosen; the whole gallery GT is scanned for the item's identity (``pair_id`` and ``style``), and for each k
    separately the top-k retrieved entries are walked, each checked against the identity's gallery image ids
    and, when present, against the GT boxes of that image (IoU >= ``thresh``).

    Fixed or generalised, without changing any score: the ``gellery_box`` typo (the converted gallery boxes
    are used, as evidently meant); retrieved lists are cut to ``max(ks)`` so that records of different lengths
    stack; the image's ``pair_id`` is read per item (the script asserts one pair per image, so it is the same);
    an identity without gallery items gives no hits instead of failing the script's assert. The singleton-list
    bug is reproduced only with ``legacy_singleton_bug`` (then a single-item identity's image ids match
    nothing, as the script's ``np.where(list == id)`` finds nothing), as in the evaluator.

    Cost note: most of its time (about 80% on the real validation GT) is the script's ``np.intersect1d`` of two
    whole-gallery index lists per query item; a boolean mask there instead would make it about 10x faster.
    """
    max_k = max(ks)
    res_image = np.array([r["query_image_id"] for r in results])
    res_score = np.array([r["query_score"] for r in results], dtype=np.float64)
    res_cls = np.array([r["query_cls"] for r in results])
    res_box = np.array([_xywh(r["query_bbox"]) for r in results], dtype=np.float64).reshape(-1, 4)
    res_gallery_id = np.array([r["gallery_image_id"][:max_k] for r in results]).reshape(-1, max_k)
    boxes = np.array([r["gallery_bbox"][:max_k] for r in results], dtype=np.float64).reshape(-1, max_k, 4)
    res_gallery_box = np.stack(
        [boxes[..., 0], boxes[..., 1], boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]], axis=-1
    )
    q_image = np.array([q["query_image_id"] for q in query_gt])
    q_box = np.array([_xywh(q["bbox"]) for q in query_gt], dtype=np.float64).reshape(-1, 4)
    q_cls = np.array([q["cls"] for q in query_gt])
    q_style = np.array([q["style"] for q in query_gt])
    q_pair = np.array([q["pair_id"] for q in query_gt])
    g_image = np.array([g["gallery_image_id"] for g in gallery_gt])
    g_box = np.array([_xywh(g["bbox"]) for g in gallery_gt], dtype=np.float64).reshape(-1, 4)
    g_style = np.array([g["style"] for g in gallery_gt])
    g_pair = np.array([g["pair_id"] for g in gallery_gt])

    num_queries = int((q_style > 0).sum())
    correct = dict.fromkeys(ks, 0)
    evaluated = 0
    for image in np.unique(q_image):
        det_rows = np.where(res_image == image)[0]  # linear scan of the whole result list
        if len(det_rows) == 0:
            continue
        item_rows = np.where(q_image == image)[0]
        iou = mask_utils.iou(res_box[det_rows], q_box[item_rows], np.zeros(len(item_rows)))
        assigned = np.argmax(iou, axis=1)  # first maximum, no minimum IoU
        for j in range(len(item_rows)):
            style, cls, pair = q_style[item_rows[j]], q_cls[item_rows[j]], q_pair[item_rows[j]]
            if style <= 0:
                continue
            candidates = np.intersect1d(np.where(assigned == j)[0], np.where(res_cls[det_rows] == cls)[0])
            if len(candidates) == 0:
                continue
            evaluated += 1
            chosen = det_rows[candidates[np.argmax(res_score[det_rows][candidates])]]
            retrieved_ids, retrieved_boxes = res_gallery_id[chosen], res_gallery_box[chosen]
            # scan the whole gallery GT for the item's identity
            identity = np.intersect1d(np.where(g_pair == pair)[0], np.where(g_style == style)[0])
            identity_images, identity_boxes = g_image[identity], g_box[identity]
            if legacy_singleton_bug and len(identity) == 1:
                identity_images = identity_images[:0]  # the script's wrapped list never matches an id
            for k in ks:
                for t in range(k):
                    if retrieved_ids[t] in identity_images:
                        which = np.where(identity_images == retrieved_ids[t])[0]
                        overlap = mask_utils.iou(
                            retrieved_boxes[t : t + 1], identity_boxes[which], np.zeros(len(which))
                        )
                        if (np.asarray(overlap) >= thresh).any():
                            correct[k] += 1
                            break
    out = {f"top{k}": correct[k] / num_queries for k in ks}
    out.update(num_queries=num_queries, evaluated=evaluated, missed=num_queries - evaluated)
    return out


def _jitter(rng, box, scale):
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    d = rng.normal(0, scale, 4) * [w, h, w, h]
    return [
        float(x1 + d[0]),
        float(y1 + d[1]),
        float(max(x1 + d[0] + 1, x2 + d[2])),
        float(max(y1 + d[1] + 1, y2 + d[3])),
    ]


def _random_box(rng):
    x, y = rng.uniform(0, 300, 2)
    return [float(x), float(y), float(x + rng.uniform(5, 200)), float(y + rng.uniform(5, 200))]


def synthetic_results(rng, query_gt, gallery_gt, *, per_image=2.3, k=20, p_correct_cls=0.8, p_true=0.3):
    """Detections around GT boxes (and stray ones), wrong classes, missing images, mixed retrieved lists."""
    by_identity = defaultdict(list)
    for g in gallery_gt:
        by_identity[(g["pair_id"], g["style"])].append(g)
    items_of = defaultdict(list)
    for q in query_gt:
        items_of[q["query_image_id"]].append(q)
    results = []
    for image, items in items_of.items():
        for _ in range(rng.poisson(per_image)):
            item = items[rng.integers(len(items))]
            stray = rng.random() < 0.1
            box = _random_box(rng) if stray else _jitter(rng, item["bbox"], 0.15)
            cls = item["cls"] if rng.random() < p_correct_cls else int(rng.integers(1, 14))
            pool = by_identity.get((item["pair_id"], item["style"]), [])
            ids, boxes = [], []
            for _ in range(k):
                if pool and rng.random() < p_true:
                    g = pool[rng.integers(len(pool))]
                    boxes.append(_jitter(rng, g["bbox"], rng.choice([0.02, 0.3])))
                else:
                    g = gallery_gt[rng.integers(len(gallery_gt))]
                    boxes.append(_jitter(rng, g["bbox"], 0.05) if rng.random() < 0.5 else _random_box(rng))
                ids.append(int(g["gallery_image_id"]))
            results.append(
                {
                    "query_image_id": int(image),
                    "query_bbox": box,
                    "query_score": float(np.round(rng.random(), 1)),  # rounded: score ties happen
                    "query_cls": cls,
                    "gallery_image_id": ids,
                    "gallery_bbox": boxes,
                }
            )
    return results


def synthetic_ground_truth(rng, *, n_query_images=40, n_pairs=12):
    query_gt, gallery_gt = [], []
    image = 1
    for _ in range(n_query_images):
        pair = int(rng.integers(1, n_pairs + 1))
        for _ in range(int(rng.integers(1, 4))):
            query_gt.append(
                {
                    "query_image_id": image,
                    "bbox": _random_box(rng),
                    "cls": int(rng.integers(1, 4)),
                    "style": int(rng.integers(0, 3)),
                    "pair_id": pair,
                }
            )
        image += 1
    # the same box twice in one image: the second item can never be selected (argmax takes the first)
    query_gt.append(dict(query_gt[-1], style=1, cls=query_gt[-1]["cls"]))
    for pair in range(1, n_pairs + 1):
        for _ in range(int(rng.integers(1, 4))):
            for style in (1, 2):
                if rng.random() < 0.7:
                    gallery_gt.append(
                        {"gallery_image_id": image, "bbox": _random_box(rng), "style": style, "pair_id": pair}
                    )
            image += 1
    return query_gt, gallery_gt


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("legacy", [False, True])
def test_matches_reference_loop_on_synthetic_data(seed: int, legacy: bool) -> None:
    rng = np.random.default_rng(seed)
    query_gt, gallery_gt = synthetic_ground_truth(rng)
    identities = {(g["pair_id"], g["style"]) for g in gallery_gt}
    query_gt = [q for q in query_gt if q["style"] == 0 or (q["pair_id"], q["style"]) in identities]
    results = synthetic_results(rng, query_gt, gallery_gt, p_true=0.4)
    results = [r for r in results if r["query_image_id"] % 7 != 0]  # some images without any detection
    ours = evaluate_retrieval_results(results, query_gt, gallery_gt, legacy_singleton_bug=legacy)
    ref = reference_top_k(results, query_gt, gallery_gt, legacy_singleton_bug=legacy)
    assert ours == ref
    assert ours == straightforward_top_k(results, query_gt, gallery_gt, legacy_singleton_bug=legacy)
    assert ours["missed"] > 0 and ours["top20"] > 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("legacy", [False, True])
def test_official_structure_loop_matches_evaluator(seed: int, legacy: bool) -> None:
    rng = np.random.default_rng(seed)
    query_gt, gallery_gt = synthetic_ground_truth(rng)
    identities = {(g["pair_id"], g["style"]) for g in gallery_gt}
    query_gt = [q for q in query_gt if q["style"] == 0 or (q["pair_id"], q["style"]) in identities]
    results = synthetic_results(rng, query_gt, gallery_gt, p_true=0.4)
    results = [r for r in results if r["query_image_id"] % 7 != 0]
    ours = evaluate_retrieval_results(results, query_gt, gallery_gt, legacy_singleton_bug=legacy)
    assert ours == official_structure_top_k(results, query_gt, gallery_gt, legacy_singleton_bug=legacy)
    assert ours["missed"] > 0 and ours["top20"] > 0


def test_hand_made_case() -> None:
    query_gt = [
        {"query_image_id": 1, "bbox": [0, 0, 10, 10], "cls": 1, "style": 1, "pair_id": 5},
        {"query_image_id": 1, "bbox": [20, 20, 30, 30], "cls": 2, "style": 0, "pair_id": 5},
        {"query_image_id": 2, "bbox": [0, 0, 10, 10], "cls": 1, "style": 2, "pair_id": 6},
    ]
    gallery_gt = [
        {"gallery_image_id": 10, "bbox": [0, 0, 10, 10], "style": 1, "pair_id": 5},
        {"gallery_image_id": 11, "bbox": [0, 0, 10, 10], "style": 2, "pair_id": 6},
    ]
    far = [100, 100, 110, 110]
    results = [
        # stray detection overlapping nothing: argmax of zeros -> item 0; highest score but wrong class
        {
            "query_image_id": 1,
            "query_bbox": far,
            "query_score": 0.99,
            "query_cls": 2,
            "gallery_image_id": [10, 10],
            "gallery_bbox": [far, far],
        },
        # the detection used for item 0: rank 2 is the right image with IoU 0.5 (threshold is inclusive)
        {
            "query_image_id": 1,
            "query_bbox": [0, 0, 10, 9],
            "query_score": 0.5,
            "query_cls": 1,
            "gallery_image_id": [11, 10],
            "gallery_bbox": [[0, 0, 10, 10], [0, 0, 10, 5]],
        },
        # image 2: only a wrong-class detection -> missed
        {
            "query_image_id": 2,
            "query_bbox": [0, 0, 10, 10],
            "query_score": 0.9,
            "query_cls": 3,
            "gallery_image_id": [11, 11],
            "gallery_bbox": [[0, 0, 10, 10], [0, 0, 10, 10]],
        },
    ]
    out = evaluate_retrieval_results(results, query_gt, gallery_gt, ks=(1, 2))
    assert out == {"top1": 0.0, "top2": 0.5, "num_queries": 2, "evaluated": 1, "missed": 1}
    assert out == reference_top_k(results, query_gt, gallery_gt, ks=(1, 2))
    assert out == straightforward_top_k(results, query_gt, gallery_gt, ks=(1, 2))
    assert out == official_structure_top_k(results, query_gt, gallery_gt, ks=(1, 2))
    # pair 5 / style 1 has a single gallery item: the published script can never score it a hit
    legacy = evaluate_retrieval_results(results, query_gt, gallery_gt, ks=(1, 2), legacy_singleton_bug=True)
    assert legacy == {"top1": 0.0, "top2": 0.0, "num_queries": 2, "evaluated": 1, "missed": 1}
    assert legacy == straightforward_top_k(
        results, query_gt, gallery_gt, ks=(1, 2), legacy_singleton_bug=True
    )
    assert legacy == official_structure_top_k(
        results, query_gt, gallery_gt, ks=(1, 2), legacy_singleton_bug=True
    )


def test_coco_iou_matches_pycocotools() -> None:
    rng = np.random.default_rng(0)
    a = np.array([_random_box(rng) for _ in range(30)])
    b = np.array([_jitter(rng, box, 0.3) for box in a[:20]] + [_random_box(rng) for _ in range(10)])
    expected = np.asarray(mask_utils.iou([_xywh(x) for x in a], [_xywh(x) for x in b], [0] * len(b)))
    np.testing.assert_array_equal(coco_iou(a[:, None], b[None, :]), expected)
    plain = [[plain_iou(x, y) for y in b] for x in a]
    np.testing.assert_array_equal(np.array(plain), expected)
    # integer coordinates, touching edges and a degenerate box go through the same arithmetic
    edge_cases = [[0, 0, 10, 10], [10, 0, 20, 10], [0, 0, 0, 10], [5, 5, 15, 15], [0.1, 0.2, 0.3, 0.7]]
    expected = np.asarray(
        mask_utils.iou([_xywh(x) for x in edge_cases], [_xywh(x) for x in edge_cases], [0] * len(edge_cases))
    )
    np.testing.assert_array_equal(
        np.array([[plain_iou(x, y) for y in edge_cases] for x in edge_cases]), expected
    )


def test_short_and_malformed_records_are_named() -> None:
    query_gt = [{"query_image_id": 1, "bbox": [0, 0, 10, 10], "cls": 1, "style": 1, "pair_id": 5}]
    gallery_gt = [{"gallery_image_id": 10, "bbox": [0, 0, 10, 10], "style": 1, "pair_id": 5}]
    good = {
        "query_image_id": 1,
        "query_bbox": [0, 0, 10, 10],
        "query_score": 1.0,
        "query_cls": 1,
        "gallery_image_id": [10] * 20,
        "gallery_bbox": [[0, 0, 10, 10]] * 20,
    }
    assert evaluate_retrieval_results([good], query_gt, gallery_gt)["top1"] == 1.0
    short = dict(good, gallery_image_id=[10] * 19)
    with pytest.raises(ValueError, match=r"results record 1: 19 gallery_image_id .* top-20"):
        evaluate_retrieval_results([good, short], query_gt, gallery_gt)
    missing = {k: v for k, v in good.items() if k != "query_cls"}
    with pytest.raises(ValueError, match=r"results record 0: .*query_cls"):
        evaluate_retrieval_results([missing], query_gt, gallery_gt)
    bad_box = dict(good, query_bbox=[0, 0, 10])
    with pytest.raises(ValueError, match=r"results record 2: query_bbox"):
        evaluate_retrieval_results([good, good, bad_box], query_gt, gallery_gt)
    bad_gallery = dict(good, gallery_bbox=[[0, 0, 10, 10]] * 19 + [[1, 2]])
    with pytest.raises(ValueError, match=r"results record 0: gallery_bbox\[19\]"):
        evaluate_retrieval_results([bad_gallery], query_gt, gallery_gt)
    with pytest.raises(ValueError, match=r"query_gt record 0: missing key"):
        evaluate_retrieval_results([good], [{"bbox": [0, 0, 1, 1]}], gallery_gt)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate_retrieval_results("nope.json", query_gt, gallery_gt)


def _items_from_gt(query_gt, gallery_gt):
    def item(rec, image_key, source):
        return SimpleNamespace(
            image_id=rec[image_key],
            bbox=tuple(rec["bbox"]),
            category_id=rec.get("cls", 1),
            style=rec["style"],
            pair_id=rec["pair_id"],
            source=source,
            identity=(rec["pair_id"], rec["style"]),
        )

    queries = [item(q, "query_image_id", "user") for q in query_gt if q["style"] > 0]
    gallery = [item(g, "gallery_image_id", "shop") for g in gallery_gt if g["style"] > 0]
    return queries, gallery


def test_gt_boxes_official_equals_recall_on_random_example(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    query_gt, gallery_gt = synthetic_ground_truth(rng, n_query_images=30, n_pairs=4)
    query_gt = query_gt[:-1]  # drop the duplicated box (the one pathological case)
    queries, gallery = _items_from_gt(query_gt, gallery_gt)
    identities = {g.identity for g in gallery}
    queries = [q for q in queries if q.identity in identities]
    # features close to a per-identity centre so that there are hits and misses at every k
    centres = {ident: rng.standard_normal(16) for ident in identities}
    qf = np.stack([centres[q.identity] + rng.standard_normal(16) for q in queries]).astype(np.float32)
    gf = np.stack([centres[g.identity] + rng.standard_normal(16) for g in gallery]).astype(np.float32)
    out = evaluate_gt_boxes(qf, gf, queries, gallery, ks=(1, 3, 5), results_path=tmp_path / "r.json")
    assert (tmp_path / "r.json").is_file()
    for k in (1, 3, 5):
        assert out[f"official_top{k}"] == pytest.approx(out[f"recall@{k}"], abs=1e-12)
    assert 0 < out["recall@1"] < out["recall@5"] <= 1
    assert out["official_missed"] == 0


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    path = write_retrieval_results(
        tmp_path / "r.json",
        query_image_ids=[1],
        query_bboxes=[[0, 0, 1, 1]],
        query_scores=[0.5],
        query_cls=[3],
        gallery_image_ids=np.arange(25)[None],
        gallery_bboxes=np.zeros((1, 25, 4)),
    )
    records = json.loads(path.read_text())
    assert set(records[0]) == {
        "query_image_id",
        "query_bbox",
        "query_score",
        "query_cls",
        "gallery_image_id",
        "gallery_bbox",
    }
    assert len(records[0]["gallery_image_id"]) == 20 and len(records[0]["gallery_bbox"]) == 20
    with pytest.raises(ValueError, match="only 5 given"):
        write_retrieval_results(
            tmp_path / "s.json",
            query_image_ids=[1],
            query_bboxes=[[0, 0, 1, 1]],
            query_scores=[1],
            query_cls=[1],
            gallery_image_ids=np.zeros((1, 5)),
            gallery_bboxes=np.zeros((1, 5, 4)),
        )


@pytest.fixture(scope="module")
def real_gt():
    require_shared_data("deepfashion2", "query_gt.json")
    return json.loads((DATA / "query_gt.json").read_text()), json.loads(
        (DATA / "gallery_gt.json").read_text()
    )


def test_real_files_load_and_example_scores(real_gt) -> None:
    query_gt, gallery_gt = real_gt
    assert len(query_gt) == 15752 and len(gallery_gt) == 24012
    out = evaluate_retrieval_results(
        DATA / "example_retrieval_results.json", DATA / "query_gt.json", DATA / "gallery_gt.json"
    )
    assert out["num_queries"] == 12550
    example = json.loads((DATA / "example_retrieval_results.json").read_text())
    assert out == reference_top_k(example, query_gt, gallery_gt)
    assert out == straightforward_top_k(example, query_gt, gallery_gt)


def test_real_gt_random_results_match_reference(real_gt) -> None:
    query_gt, gallery_gt = real_gt
    rng = np.random.default_rng(0)
    subset_images = set(
        rng.choice(sorted({q["query_image_id"] for q in query_gt}), 300, replace=False).tolist()
    )
    results = synthetic_results(
        rng, [q for q in query_gt if q["query_image_id"] in subset_images], gallery_gt
    )
    for legacy in (False, True):
        ours = evaluate_retrieval_results(results, query_gt, gallery_gt, legacy_singleton_bug=legacy)
        assert ours == reference_top_k(results, query_gt, gallery_gt, legacy_singleton_bug=legacy)
        assert ours == straightforward_top_k(results, query_gt, gallery_gt, legacy_singleton_bug=legacy)
        assert ours == official_structure_top_k(results, query_gt, gallery_gt, legacy_singleton_bug=legacy)


def test_real_gt_boxes_official_equals_recall(real_gt) -> None:
    query_gt, gallery_gt = real_gt
    queries, gallery = _items_from_gt(query_gt, gallery_gt)
    # the query items of the first 2,500 query images (keeps the test fast) against the whole gallery
    first_images = sorted({q.image_id for q in queries})[:2500]
    queries = [q for q in queries if q.image_id <= first_images[-1]]
    rng = np.random.default_rng(0)
    # random features, but correlated with identity so that R@k is far from zero
    idents = sorted({g.identity for g in gallery} | {q.identity for q in queries})
    centre = dict(zip(idents, rng.standard_normal((len(idents), 32)).astype(np.float32)))
    qf = np.stack([centre[q.identity] for q in queries]) + rng.standard_normal((len(queries), 32)).astype(
        np.float32
    )
    gf = np.stack([centre[g.identity] for g in gallery]) + rng.standard_normal((len(gallery), 32)).astype(
        np.float32
    )
    out = evaluate_gt_boxes(qf, gf, queries, gallery, ks=(1, 5, 10, 20))
    assert out["num_queries"] == len(queries) and out["num_excluded"] == 0
    assert 0.05 < out["recall@1"] < out["recall@20"] < 1
    # only the two duplicated query boxes of the real file can differ (their second item is "missed")
    for k in (1, 5, 10, 20):
        assert abs(out[f"official_top{k}"] - out[f"recall@{k}"]) * len(queries) <= out["official_missed"]
    assert out["official_missed"] <= 2
