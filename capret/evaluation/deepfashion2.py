"""The official DeepFashion2 consumer-to-shop retrieval protocol, vectorised, plus the GT-box variant.

The official evaluator (``deepfashion2_api/PythonAPI/deepfashion2_retrieval_test.py`` in
switchablenorms/DeepFashion2, described in ``evaluation/evaluation.md``) scores *detections* of consumer
images, each with its top-20 retrieved shop detections. Its algorithm, which :func:`evaluate_retrieval_results`
reproduces exactly:

1. Every detection of a query image is assigned to the ground-truth query item of that image with the highest
   box IoU. There is **no minimum IoU**: a detection overlapping nothing still goes to the first item of the
   image (``argmax`` of an all-zero row); ties go to the item listed first in ``query_gt``.
2. For every ground-truth query item with ``style > 0`` the detections assigned to it whose ``query_cls``
   equals the item's ``cls`` are collected, and the one with the highest ``query_score`` is used (ties: the
   one listed first in the result file). An item with no such detection is *missed*.
3. A retrieved shop entry at rank t is a hit when its ``gallery_image_id`` holds a ground-truth gallery item
   with the query's ``pair_id`` and ``style`` whose box has IoU >= 0.5 with the retrieved box. top-k is a hit
   at any rank < k.
4. top-k = hits / (number of ``style > 0`` items in ``query_gt``): missed items count as failures.

IoU is computed as pycocotools ``maskUtils.iou`` does (boxes converted to ``[x, y, w, h]`` in float64,
intersection from ``x + w``), so borderline values at the 0.5 threshold agree with the official script.

Two deviations of the published script are deliberate, both documented here:

* The script crashes on its own typo (``gellery_box``) and is Python 2; we implement what it evidently meant.
* When an identity has exactly **one** gallery item, the script wraps the image-id array in a list
  (``gt_gallery_image_id = [gt_gallery_image_id]``), after which its ``np.where(list == id)`` finds nothing and
  such queries can never be hits (1,251 of the 12,550 validation queries). That is an accident, contradicts
  ``evaluation.md`` and would make GT-box top-k differ from recall@k, so by default singletons are scored
  normally; ``legacy_singleton_bug=True`` reproduces the script's numbers bit for bit.

Input validation names the record and field of every malformed value the score depends on. A retrieved box
is read only when its gallery image holds an item of the query's identity (otherwise it cannot be a hit), so
a malformed box elsewhere does not stop the evaluation.

The script's own ``miss_num`` skips query images without any detection; our ``missed`` counts every
``style > 0`` item without a selected detection, so ``missed + evaluated == num_queries`` always holds.
"""

from __future__ import annotations

import itertools
import json
import operator
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capret.errors import ConfigError, DataError, NonFiniteError, require_finite
from capret.io import atomic_write_json, read_json

__all__ = [
    "OFFICIAL_KS",
    "IOU_THRESHOLD",
    "RESULT_KEYS",
    "coco_iou",
    "load_json_records",
    "evaluate_retrieval_results",
    "write_retrieval_results",
    "items_to_ground_truth",
    "evaluate_gt_boxes",
]

#: The cut-offs the official script prints.
OFFICIAL_KS: tuple[int, ...] = (1, 5, 10, 15, 20)
#: IoU a retrieved shop box needs with a ground-truth gallery box of the query's identity.
IOU_THRESHOLD = 0.5
#: Fields of one record of the official retrieval result format.
RESULT_KEYS = ("query_image_id", "query_bbox", "query_score", "query_cls", "gallery_image_id", "gallery_bbox")
QUERY_GT_KEYS = ("query_image_id", "bbox", "cls", "style", "pair_id")
GALLERY_GT_KEYS = ("gallery_image_id", "bbox", "style", "pair_id")


def coco_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Elementwise (broadcast) IoU of ``[..., 4]`` xyxy boxes, computed the way pycocotools does.

    pycocotools works on ``[x, y, w, h]``: ``w = x2 - x1`` then the right edge is ``x + w``, which in floating
    point is not always ``x2``. Reproducing that keeps threshold decisions identical to the official script.
    """
    a = np.asarray(boxes_a, dtype=np.float64)
    b = np.asarray(boxes_b, dtype=np.float64)
    ax, ay, aw, ah = a[..., 0], a[..., 1], a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
    bx, by, bw, bh = b[..., 0], b[..., 1], b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    w = np.minimum(aw + ax, bw + bx) - np.maximum(ax, bx)
    h = np.minimum(ah + ay, bh + by) - np.maximum(ay, by)
    valid = (w > 0) & (h > 0)
    inter = np.where(valid, w * h, 0.0)
    union = aw * ah + bw * bh - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, inter / np.where(valid, union, 1.0), 0.0)


def load_json_records(source: str | os.PathLike[str] | Sequence[Mapping[str, Any]], *, what: str) -> list:
    """A list of records from a JSON file path or an already-loaded list."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        data = read_json(path, what=f"{what} file")
        if not isinstance(data, list):
            raise DataError(f"{what} file {path} must hold a JSON list, got {type(data).__name__}")
        return data
    if not isinstance(source, Sequence):
        raise ValueError(f"{what} must be a path or a list of records, got {type(source).__name__}")
    return list(source)


def _bad(what: str, index: int, record: Any, problem: str) -> DataError:
    head = json.dumps(record, default=str)[:160] if isinstance(record, dict) else repr(record)[:160]
    return DataError(f"{what} record {index}: {problem} (record starts {head})")


def _boxes(boxes: list, *, n: int) -> np.ndarray:
    """``[n, 4]`` float64 from a list of 4-number lists; ValueError/TypeError when any is malformed."""
    lengths = np.fromiter(map(len, boxes), dtype=np.int64, count=n)
    if n and (lengths != 4).any():
        raise DataError("box length")
    return np.fromiter(itertools.chain.from_iterable(boxes), dtype=np.float64, count=4 * n).reshape(n, 4)


def _gt_arrays(records: list, *, what: str, keys: tuple[str, ...], id_key: str) -> dict[str, np.ndarray]:
    n = len(records)
    try:
        # a list comprehension per field, then one C-level conversion: the cheapest path from dicts in CPython
        out = {
            "image": np.array([r[id_key] for r in records], dtype=np.int64),
            "box": _boxes([r["bbox"] for r in records], n=n),
            "style": np.array([r["style"] for r in records], dtype=np.int64),
            "pair": np.array([r["pair_id"] for r in records], dtype=np.int64),
        }
        if "cls" in keys:
            out["cls"] = np.array([r["cls"] for r in records], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise _bad(what, i, rec, f"expected an object with keys {', '.join(keys)}") from None
            missing = [k for k in keys if k not in rec]
            if missing:
                raise _bad(
                    what, i, rec, f"missing key(s) {', '.join(missing)}; required: {', '.join(keys)}"
                ) from None
            box = rec["bbox"]
            if not (
                isinstance(box, list | tuple)
                and len(box) == 4
                and all(isinstance(v, int | float) for v in box)
            ):
                raise _bad(what, i, rec, f"bbox must be [x1, y1, x2, y2], got {box!r}") from None
            for k in keys:
                if k != "bbox" and not isinstance(rec[k], int | float):
                    raise _bad(what, i, rec, f"{k} must be a number, got {rec[k]!r}") from None
        raise
    require_finite(out["box"], what=f"{what} bbox (index [record, coordinate])")
    return out


def _result_arrays(records: list, *, max_k: int) -> dict[str, Any]:
    """Scalar fields and query boxes of every result record as arrays, after validating every record.

    One list comprehension per field followed by ``np.array`` is the cheapest way to gather a field from a
    list of dicts in CPython (a generator into ``np.fromiter`` costs about twice as much); the short-list check
    only needs the minimum length, so it stays a single C-level ``min(map(len, ...))`` pass per field.
    """
    n = len(records)
    try:
        image = [r["query_image_id"] for r in records]
        score = [r["query_score"] for r in records]
        cls = [r["query_cls"] for r in records]
        box = [r["query_bbox"] for r in records]
        shortest = min(
            min(map(len, map(operator.itemgetter("gallery_image_id"), records)), default=max_k),
            min(map(len, map(operator.itemgetter("gallery_bbox"), records)), default=max_k),
        )
    except (KeyError, TypeError):
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise _bad(
                    "results", i, rec, f"expected an object with keys {', '.join(RESULT_KEYS)}"
                ) from None
            missing = [k for k in RESULT_KEYS if k not in rec]
            if missing:
                raise _bad(
                    "results",
                    i,
                    rec,
                    f"missing key(s) {', '.join(missing)}; required: {', '.join(RESULT_KEYS)}",
                ) from None
            for k in ("gallery_image_id", "gallery_bbox"):
                if not isinstance(rec[k], list | tuple):
                    raise _bad(
                        "results", i, rec, f"{k} must be a list, got {type(rec[k]).__name__}"
                    ) from None
        raise
    if shortest < max_k:
        for i, rec in enumerate(records):
            n_ids, n_boxes = len(rec["gallery_image_id"]), len(rec["gallery_bbox"])
            if min(n_ids, n_boxes) < max_k:
                raise _bad(
                    "results",
                    i,
                    rec,
                    f"{n_ids} gallery_image_id / {n_boxes} gallery_bbox entries, but top-{max_k} needs "
                    f"{max_k} each",
                )
    try:
        arrays = {
            "image": np.array(image, dtype=np.int64),
            "score": np.array(score, dtype=np.float64),
            "cls": np.array(cls, dtype=np.int64),
            "box": _boxes(box, n=n),
        }
    except (TypeError, ValueError):
        for i, rec in enumerate(records):
            b = rec["query_bbox"]
            if not (
                isinstance(b, list | tuple) and len(b) == 4 and all(isinstance(v, int | float) for v in b)
            ):
                raise _bad("results", i, rec, f"query_bbox must be [x1, y1, x2, y2], got {b!r}") from None
            for k in ("query_image_id", "query_score", "query_cls"):
                if not isinstance(rec[k], int | float):
                    raise _bad("results", i, rec, f"{k} must be a number, got {rec[k]!r}") from None
        raise
    require_finite(arrays["score"], what="results query_score (index [record])")
    require_finite(arrays["box"], what="results query_bbox (index [record, coordinate])")
    return arrays


def _refuse_repeats(det: dict[str, np.ndarray], *, path: Path | None) -> None:
    """A detection listed twice (same query image, class and box) would be counted twice by nothing, but says
    the file was concatenated or written twice: refuse it, naming both records."""
    if len(det["image"]) < 2:
        return
    keys = np.column_stack([det["image"].astype(np.float64), det["cls"].astype(np.float64), det["box"]])
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    repeated = np.nonzero(first[inverse.reshape(-1)] != np.arange(len(keys)))[0]
    if len(repeated):
        j = int(repeated[0])
        i = int(first[inverse.reshape(-1)[j]])
        raise DataError(
            f"results record {j} repeats record {i} (query_image_id {int(det['image'][j])}, query_cls "
            f"{int(det['cls'][j])}, query_bbox {det['box'][j].tolist()}); list each detection once",
            path=path,
        )


def _refuse_unknown_gallery_ids(
    records: list, gallery_images: np.ndarray, *, max_k: int, path: Path | None
) -> None:
    """Every retrieved ``gallery_image_id`` in the scored top-``max_k`` must be an image of ``gallery_gt``: an
    unknown id can never be a hit, so results of another split or gallery would score a silent, plausible 0."""
    known = np.unique(gallery_images)
    try:  # every record holds at least max_k entries (checked when the records were read)
        ids = np.array([record["gallery_image_id"][:max_k] for record in records], dtype=np.int64)
    except (TypeError, ValueError):
        return  # a malformed id is reported with its record and position where it is read
    unknown = ~np.isin(ids, known)
    if unknown.any():
        r, t = (int(v) for v in np.argwhere(unknown)[0])
        raise DataError(
            f"results record {r}: gallery_image_id[{t}] = {int(ids[r, t])} is not an image of gallery_gt (results "
            "of another split or gallery?)",
            path=path,
        )


def _retrieved_ids(records: list, rows: np.ndarray, *, max_k: int) -> np.ndarray:
    """Top-``max_k`` gallery image ids ``[S, K]`` of the selected records."""
    lists = [records[r]["gallery_image_id"] for r in rows.tolist()]
    if any(len(ids) != max_k for ids in lists):  # cut longer lists; usually all hold exactly max_k entries
        lists = [ids[:max_k] for ids in lists]
    try:
        ids = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=len(lists) * max_k)
    except (TypeError, ValueError):
        for r, ids in zip(rows.tolist(), lists, strict=True):
            for t, value in enumerate(ids[:max_k]):
                if not isinstance(value, int | float):
                    raise _bad(
                        "results", r, records[r], f"gallery_image_id[{t}] must be a number, got {value!r}"
                    ) from None
        raise
    return ids.reshape(len(lists), max_k)


def _retrieved_boxes(records: list, rows: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """``[M, 4]`` boxes ``records[rows[m]]["gallery_bbox"][ranks[m]]``: only the entries that can be hits."""
    boxes = [records[r]["gallery_bbox"][t] for r, t in zip(rows.tolist(), ranks.tolist(), strict=True)]
    try:
        out = _boxes(boxes, n=len(boxes))
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():  # a NaN box would compare false everywhere and slip through as a hit
            m = int(np.argmax(bad))
            r, t = int(rows[m]), int(ranks[m])
            raise NonFiniteError(
                f"results record {r}: gallery_bbox[{t}] holds a non-finite number: {boxes[m]!r}"
            )
        return out
    except (TypeError, ValueError):
        for r, t, b in zip(rows.tolist(), ranks.tolist(), boxes, strict=True):
            if not (
                isinstance(b, list | tuple) and len(b) == 4 and all(isinstance(v, int | float) for v in b)
            ):
                raise _bad(
                    "results", r, records[r], f"gallery_bbox[{t}] must be [x1, y1, x2, y2], got {b!r}"
                ) from None
        raise


def _row_keys(parts: Sequence[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
    """One int64 key per row for rows given as tuples of int columns, consistent across all ``parts``.

    Non-negative columns are packed directly (mixed radix) when the product of their ranges fits in 62 bits;
    otherwise each column is rank-encoded first.
    """
    n_cols = len(parts[0])
    lengths = [len(p[0]) for p in parts]
    columns = [np.concatenate([p[c].reshape(-1) for p in parts]) for c in range(n_cols)]
    if all(col.size == 0 or col.min() >= 0 for col in columns):
        radices = [int(col.max()) + 1 if col.size else 1 for col in columns]
        if float(np.prod([float(r) for r in radices])) < 2.0**62:
            key = np.zeros(sum(lengths), dtype=np.int64)
            for col, radix in zip(columns, radices, strict=True):
                key = key * radix + col
            return np.split(key, np.cumsum(lengths)[:-1])
    key = np.zeros(sum(lengths), dtype=np.int64)
    for col in columns:
        uniq, inv = np.unique(col, return_inverse=True)
        key = key * (len(uniq) + 1) + inv.reshape(-1)
    return np.split(key, np.cumsum(lengths)[:-1])


def _first_max_assignment(
    det_boxes: np.ndarray,
    det_group: np.ndarray,
    gt_boxes: np.ndarray,
    gt_starts: np.ndarray,
    gt_counts: np.ndarray,
) -> np.ndarray:
    """Global index of the GT item with the highest IoU for each detection (first one on ties)."""
    width = int(gt_counts.max()) if len(gt_counts) else 0
    offsets = np.arange(width)
    cand = gt_starts[det_group][:, None] + offsets[None, :]
    valid = offsets[None, :] < gt_counts[det_group][:, None]
    cand = np.where(valid, cand, 0)
    iou = coco_iou(det_boxes[:, None, :], gt_boxes[cand])
    iou = np.where(valid, iou, -1.0)
    return cand[np.arange(len(det_boxes)), np.argmax(iou, axis=1)]


def _select_detections(
    det: dict[str, np.ndarray], query: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-2 of the protocol: ``(scored GT item indices, chosen result row for each)``."""
    order = np.argsort(query["image"], kind="stable")  # GT items grouped by image, file order within
    images, starts, counts = np.unique(query["image"][order], return_index=True, return_counts=True)
    pos = np.searchsorted(images, det["image"])
    pos_c = np.minimum(pos, len(images) - 1)
    known = (pos < len(images)) & (images[pos_c] == det["image"])
    rows = np.nonzero(known)[0]
    if len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    local = _first_max_assignment(det["box"][rows], pos_c[rows], query["box"][order], starts, counts)
    gt_index = order[local]
    keep = (det["cls"][rows] == query["cls"][gt_index]) & (query["style"][gt_index] > 0)
    rows, gt_index = rows[keep], gt_index[keep]
    # best score per GT item; ties -> first in the result file (rows are increasing)
    sort = np.lexsort((rows, -det["score"][rows], gt_index))
    rows, gt_index = rows[sort], gt_index[sort]
    first = np.ones(len(gt_index), dtype=bool)
    first[1:] = gt_index[1:] != gt_index[:-1]
    return gt_index[first], rows[first]


def _hits(
    records: list,
    rows: np.ndarray,
    q_pair: np.ndarray,
    q_style: np.ndarray,
    gallery: dict[str, np.ndarray],
    *,
    max_k: int,
    iou_threshold: float,
    legacy_singleton_bug: bool,
) -> np.ndarray:
    """Step 3: ``hits [S, K]`` for the top-``max_k`` entries of result rows ``rows`` (identities ``q_*``).

    Only entries whose gallery image holds an item of the query's identity can be hits; their boxes are the only
    ones read from the records and compared (the other boxes' coordinates cannot change the score).
    """
    s = len(rows)
    ret_ids = _retrieved_ids(records, rows, max_k=max_k)
    hits = np.zeros(s * max_k, dtype=bool)
    if s == 0 or len(gallery["image"]) == 0:
        return hits.reshape(s, max_k)
    q_keys, g_keys = _row_keys(
        [
            (np.repeat(q_pair, max_k), np.repeat(q_style, max_k), ret_ids.reshape(-1)),
            (gallery["pair"], gallery["style"], gallery["image"]),
        ]
    )
    g_order = np.argsort(g_keys, kind="stable")
    uniq, start, count = np.unique(g_keys[g_order], return_index=True, return_counts=True)
    pos = np.minimum(np.searchsorted(uniq, q_keys), len(uniq) - 1)
    match = uniq[pos] == q_keys
    if legacy_singleton_bug:
        ident_keys, g_ident = _row_keys([(q_pair, q_style), (gallery["pair"], gallery["style"])])
        ident, ident_count = np.unique(g_ident, return_counts=True)
        idx = np.minimum(np.searchsorted(ident, ident_keys), len(ident) - 1)
        singleton = (ident[idx] == ident_keys) & (ident_count[idx] == 1)
        match &= ~np.repeat(singleton, max_k)
    entries = np.nonzero(match)[0]
    if len(entries) == 0:
        return hits.reshape(s, max_k)
    boxes = _retrieved_boxes(records, rows[entries // max_k], entries % max_k)
    lo, n_cand = start[pos[entries]], count[pos[entries]]
    offsets = np.arange(int(n_cand.max()))
    valid = offsets[None, :] < n_cand[:, None]
    cand = g_order[np.where(valid, lo[:, None] + offsets[None, :], 0)]
    iou = coco_iou(boxes[:, None, :], gallery["box"][cand])
    hits[entries] = ((iou >= iou_threshold) & valid).any(axis=1)
    return hits.reshape(s, max_k)


def evaluate_retrieval_results(
    results: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    query_gt: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    gallery_gt: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    *,
    ks: Sequence[int] = OFFICIAL_KS,
    iou_threshold: float = IOU_THRESHOLD,
    legacy_singleton_bug: bool = False,
) -> dict[str, Any]:
    """Official DeepFashion2 consumer-to-shop top-k accuracy of a result file (see the module docstring).

    Args:
        results: official-format result records (path or list), top-``max(ks)`` retrieved entries or more each.
        query_gt: ``query_gt.json`` records (``query_image_id, bbox, cls, style, pair_id``).
        gallery_gt: ``gallery_gt.json`` records (``gallery_image_id, bbox, style, pair_id``).
        ks: cut-offs; every record must list at least ``max(ks)`` retrieved entries.
        iou_threshold: IoU a retrieved box needs with a matching gallery GT box (0.5 officially).
        legacy_singleton_bug: reproduce the published script's failure on single-item identities.

    Returns:
        ``{"top1": ..., "top5": ..., "num_queries": style>0 query items, "evaluated": items with a selected
        detection, "missed": items without one}``; top-k values are fractions of ``num_queries``.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"ks must be positive integers, got {list(ks)}")
    max_k = ks[-1]
    records = load_json_records(results, what="results")
    query = _gt_arrays(
        load_json_records(query_gt, what="query_gt"),
        what="query_gt",
        keys=QUERY_GT_KEYS,
        id_key="query_image_id",
    )
    gallery = _gt_arrays(
        load_json_records(gallery_gt, what="gallery_gt"),
        what="gallery_gt",
        keys=GALLERY_GT_KEYS,
        id_key="gallery_image_id",
    )
    num_queries = int((query["style"] > 0).sum())
    if num_queries == 0:
        raise DataError("query_gt has no item with style > 0, so the official top-k is undefined")
    det = _result_arrays(records, max_k=max_k)
    where = Path(results) if isinstance(results, str | os.PathLike) else None
    _refuse_repeats(det, path=where)
    _refuse_unknown_gallery_ids(records, gallery["image"], max_k=max_k, path=where)
    gt_index, rows = _select_detections(det, query)
    hits = _hits(
        records,
        rows,
        query["pair"][gt_index],
        query["style"][gt_index],
        gallery,
        max_k=max_k,
        iou_threshold=iou_threshold,
        legacy_singleton_bug=legacy_singleton_bug,
    )
    out: dict[str, Any] = {f"top{k}": float(hits[:, :k].any(1).sum()) / num_queries for k in ks}
    out.update(num_queries=num_queries, evaluated=int(len(rows)), missed=num_queries - int(len(rows)))
    return out


def write_retrieval_results(
    path: str | os.PathLike[str],
    *,
    query_image_ids: Sequence[int] | np.ndarray,
    query_bboxes: Sequence[Sequence[float]] | np.ndarray,
    query_scores: Sequence[float] | np.ndarray,
    query_cls: Sequence[int] | np.ndarray,
    gallery_image_ids: np.ndarray,
    gallery_bboxes: np.ndarray,
    top: int = 20,
) -> Path:
    """Write detections and their retrieved shop items in the official submission format (atomically).

    ``gallery_image_ids`` is ``[N, K]`` and ``gallery_bboxes`` ``[N, K, 4]`` (xyxy), best first; the first
    ``top`` entries of each are written (the challenge asks for 20).
    """
    ids = np.asarray(gallery_image_ids, dtype=np.int64)
    boxes = np.asarray(gallery_bboxes, dtype=np.float64)
    qb = np.asarray(query_bboxes, dtype=np.float64).reshape(-1, 4)
    n = len(qb)
    lengths = {len(query_image_ids), len(query_scores), len(query_cls), ids.shape[0], boxes.shape[0]}
    if lengths != {n}:
        raise DataError(f"all inputs need one row per detection ({n}); got lengths {sorted(lengths)}")
    if ids.ndim != 2 or boxes.shape != (*ids.shape, 4):
        raise DataError(
            f"gallery_image_ids must be [N, K] and gallery_bboxes [N, K, 4]; got {ids.shape}, {boxes.shape}"
        )
    if ids.shape[1] < top:
        raise DataError(f"top={top} retrieved entries requested but only {ids.shape[1]} given per detection")
    records = [
        {
            "query_image_id": int(query_image_ids[i]),
            "query_bbox": [float(v) for v in qb[i]],
            "query_score": float(query_scores[i]),
            "query_cls": int(query_cls[i]),
            "gallery_image_id": [int(v) for v in ids[i, :top]],
            "gallery_bbox": boxes[i, :top].tolist(),
        }
        for i in range(n)
    ]
    return atomic_write_json(path, records)


def items_to_ground_truth(
    query_items: Sequence[Any], gallery_items: Sequence[Any]
) -> tuple[list[dict], list[dict]]:
    """``(query_gt, gallery_gt)`` records in the official format from :class:`capret.data.deepfashion2.Item`."""
    query_gt = [
        {
            "query_image_id": int(it.image_id),
            "bbox": [float(v) for v in it.bbox],
            "cls": int(it.category_id),
            "style": int(it.style),
            "pair_id": int(it.pair_id),
        }
        for it in query_items
    ]
    gallery_gt = [
        {
            "gallery_image_id": int(it.image_id),
            "bbox": [float(v) for v in it.bbox],
            "style": int(it.style),
            "pair_id": int(it.pair_id),
        }
        for it in gallery_items
    ]
    return query_gt, gallery_gt


def evaluate_gt_boxes(
    query_features: Any,
    gallery_features: Any,
    query_items: Sequence[Any],
    gallery_items: Sequence[Any],
    *,
    ks: Sequence[int] = (1, 5, 10, 20),
    results_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Ground-truth-box consumer-to-shop evaluation: mAP / R@k, and the official top-k of the same ranking.

    Each query item (user side, ``style > 0``) is a "detection" with its annotated box, class and score 1; its
    top-``max(ks)`` gallery items are written in the official result format (to ``results_path``, or a
    temporary file), read back and scored by :func:`evaluate_retrieval_results` against ground truth built from
    the same items. With GT boxes the official top-k equals recall@k (a retrieved item is a hit exactly when it
    shares the query's identity), which makes this a consistency check of both evaluators. The exceptions are
    pathological annotations: two query items of one image with identical boxes (the second is "missed") and a
    wrong-identity gallery item overlapping a right one in the same image at IoU >= 0.5 (an official hit).

    Args:
        query_features: ``[Q, D]`` embeddings of ``query_items``.
        gallery_features: ``[G, D]`` embeddings of ``gallery_items``.
        query_items: :class:`capret.data.deepfashion2.Item` queries (``gt_box_protocol(...)[0].items``).
        gallery_items: gallery items (``gt_box_protocol(...)[1].items``).
        ks: cut-offs for R@k and official top-k (at most the gallery size).
        results_path: keep the official-format results file here.

    Returns:
        ``{"map", "map_at_r", "recall@k"..., "official_top{k}"..., "official_missed", "num_queries",
        "num_excluded", "map_depth"}``.
    """
    import tempfile

    from capret.evaluation.retrieval_eval import retrieve_and_evaluate

    ks = sorted({int(k) for k in ks})
    if len(query_items) != len(query_features) or len(gallery_items) != len(gallery_features):
        raise DataError(
            f"{len(query_features)} query / {len(gallery_features)} gallery feature rows for "
            f"{len(query_items)} / {len(gallery_items)} items"
        )
    if ks[-1] > len(gallery_items):
        raise ConfigError(f"max(ks) = {ks[-1]} exceeds the gallery size {len(gallery_items)}; lower --ks")
    identities = sorted({it.identity for it in query_items} | {it.identity for it in gallery_items})
    label_of = {ident: i for i, ident in enumerate(identities)}
    ql = np.array([label_of[it.identity] for it in query_items], dtype=np.int64)
    gl = np.array([label_of[it.identity] for it in gallery_items], dtype=np.int64)
    run = retrieve_and_evaluate(query_features, gallery_features, ql, gl, ks=ks)
    top = run.ranking[:, : ks[-1]]
    g_img = np.array([it.image_id for it in gallery_items], dtype=np.int64)
    g_box = np.array([it.bbox for it in gallery_items], dtype=np.float64).reshape(-1, 4)
    query_gt, gallery_gt = items_to_ground_truth(query_items, gallery_items)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(results_path) if results_path is not None else Path(tmp) / "retrieval_results.json"
        write_retrieval_results(
            path,
            query_image_ids=[it.image_id for it in query_items],
            query_bboxes=[it.bbox for it in query_items],
            query_scores=np.ones(len(query_items)),
            query_cls=[it.category_id for it in query_items],
            gallery_image_ids=g_img[top],
            gallery_bboxes=g_box[top],
            top=ks[-1],
        )
        official = evaluate_retrieval_results(path, query_gt, gallery_gt, ks=ks)
    out = dict(run.metrics)
    out.update({f"official_top{k}": official[f"top{k}"] for k in ks})
    out["official_missed"] = official["missed"]
    return out
