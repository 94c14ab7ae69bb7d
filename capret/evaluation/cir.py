"""Composed image retrieval metrics and official submission writers (FashionIQ, CIRR, CIRCO).

Every metric takes rankings (gallery image names or ids, best first) and the benchmark's own annotation file
(a path, or the loaded list, e.g. ``dataset.annotations``), and returns fractions in ``[0, 1]`` keyed
``<metric>@<k>``. The numbers equal those of the official protocols on the same rankings:

* **FashionIQ** (Wu et al. 2021; CLIP4Cir's evaluation): Recall@K of the single target within the category's
  gallery, *without* removing the reference; per category, then averaged over categories, and ``average`` =
  the mean of the averaged R@10 and R@50, the single number papers report.
* **CIRR** (Liu et al. 2021, evaluation server): Recall@K over the whole split with the reference image
  removed from each ranking; Recall_subset@K ranks only the query's ``img_set.members`` other than the
  reference, in the order of the full ranking.
* **CIRCO** (Baldrati et al. 2023, ``src/evaluation.py`` of the official repository):
  ``mAP@K = sum_{i<=K} P@i * rel_i / min(|GT|, K)`` over all ground truths, Recall@K on ``target_img_id``.

A ranking holding the same image twice is an error: it would count one ground truth twice in mAP. A ranking
shorter than the largest K is an error too, since the metric would silently treat the missing tail as misses.

``rank_gallery`` turns query and gallery embeddings into such rankings with a chunked matmul + top-k, dropping
each query's reference image (CIRR) when asked.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from capret.errors import ConfigError, DataError, require_finite
from capret.io import atomic_write_json, read_json

__all__ = [
    "circo_metrics",
    "cirr_metrics",
    "cirr_subset_ranking",
    "fashioniq_recall",
    "rank_gallery",
    "write_circo_submission",
    "write_cirr_submission",
]

N = TypeVar("N", bound=Hashable)
Annotations = Path | str | Sequence[Mapping[str, Any]]

CIRR_SUBMISSION_VERSION = "rc2"
CIRR_TOP_RECALL = 50  # the server reads the top 50 of the full ranking
CIRR_TOP_SUBSET = 3  # and the top 3 of the subset ranking
CIRCO_TOP = 50  # the CIRCO server reads the top 50 ids per query
SEMANTIC_K = 10  # CIRCO's per-semantic-aspect breakdown is mAP@10


# ----------------------------------------------------------------------------------------------- helpers
def _load(annotations: Annotations, *, what: str) -> list[Mapping[str, Any]]:
    if isinstance(annotations, (str, Path)):
        path = Path(annotations)
        data = read_json(path, what=f"{what} annotation file")
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of {what} queries")
        return data
    return list(annotations)


def _check_ks(ks: Iterable[int], *, name: str) -> list[int]:
    out = [int(k) for k in ks]
    if not out or any(k <= 0 for k in out):
        raise ConfigError(f"{name} must be positive integers, got {list(ks)!r}")
    return out


def _int_id(value: Any, *, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be an integer id (or its digits), got {value!r}") from None


def _by_int_key(rankings: Mapping[Any, Sequence[Any]], *, what: str) -> dict[int, Sequence[Any]]:
    out: dict[int, Sequence[Any]] = {}
    for key, ranking in rankings.items():
        qid = _int_id(key, what=f"{what} query id")
        if qid in out:
            raise DataError(f"{what}: query id {key!r} is given twice (as int and str)")
        out[qid] = ranking
    return out


def _check_coverage(given: Iterable[int], expected: Sequence[int], *, what: str) -> None:
    given_set, expected_set = set(given), set(expected)
    missing = [q for q in expected if q not in given_set]
    extra = sorted(given_set - expected_set)
    if missing:
        raise DataError(f"{what}: no ranking for {len(missing)} annotated queries, e.g. {missing[:5]}")
    if extra:
        raise DataError(f"{what}: rankings for {len(extra)} queries not in the annotations, e.g. {extra[:5]}")


def _check_unique(ranking: Sequence[Any], *, what: str) -> None:
    if len(set(ranking)) == len(ranking):
        return
    seen: set[Any] = set()
    for x in ranking:
        if x in seen:
            raise DataError(f"{what}: image {x!r} appears more than once in the ranking")
        seen.add(x)


def _check_length(ranking: Sequence[Any], need: int, *, what: str, note: str = "") -> None:
    if len(ranking) < need:
        raise DataError(f"{what}: ranking has {len(ranking)} entries{note}, need at least {need}")


def _recall_at_ks(target_positions: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose target sits at a 0-based position ``< k`` (``inf`` = not ranked)."""
    return {k: float(np.mean(target_positions < k)) for k in ks}


def _position(ranking: Sequence[Any], item: Any, limit: int) -> float:
    for i, x in enumerate(ranking[:limit]):
        if x == item:
            return float(i)
    return float("inf")


# ----------------------------------------------------------------------------------------------- CIRCO
def circo_metrics(
    predictions: Mapping[Any, Sequence[Any]],
    annotations: Annotations,
    *,
    ks: Sequence[int] = (5, 10, 25, 50),
    semantic_aspects: bool = False,
) -> dict[str, float]:
    """CIRCO mAP@K (all ground truths) and Recall@K (``target_img_id``), as the official evaluator.

    Args:
        predictions: query id (int or its digits) -> COCO image ids, best first, at least ``max(ks)`` long.
        annotations: ``annotations/val.json`` or its loaded list.
        ks: cut-offs; the official ones are 5, 10, 25, 50.
        semantic_aspects: also report mAP@10 per annotated semantic aspect (``aspect/<name>/map@10``), the
            breakdown the official evaluator prints (CIRCO paper, section 5).

    Returns:
        ``{"map@5": ..., "recall@5": ..., ...}`` as fractions.
    """
    ks = _check_ks(ks, name="circo_metrics ks")
    records = _load(annotations, what="CIRCO")
    by_id = _by_int_key(predictions, what="CIRCO predictions")
    query_ids = [_int_id(r.get("id"), what="CIRCO annotation 'id'") for r in records]
    _check_coverage(by_id, query_ids, what="CIRCO predictions")
    kmax = max([*ks, SEMANTIC_K] if semantic_aspects else ks)
    hits = np.zeros((len(records), kmax), dtype=bool)
    is_target = np.zeros((len(records), kmax), dtype=bool)
    num_gt = np.zeros(len(records), dtype=np.float64)
    for row, (qid, record) in enumerate(zip(query_ids, records)):
        if record.get("gt_img_ids") is None or record.get("target_img_id") is None:
            raise DataError(f"CIRCO query {qid}: annotations lack 'gt_img_ids'/'target_img_id' (test split?)")
        gt = {int(g) for g in record["gt_img_ids"] if int(g) != 0}  # 0 pads gt lists in collated batches
        ranking = [_int_id(x, what=f"CIRCO query {qid} prediction") for x in by_id[qid]]
        _check_unique(ranking, what=f"CIRCO query {qid}")
        _check_length(ranking, kmax, what=f"CIRCO query {qid}", note=f" (k={kmax})")
        top = ranking[:kmax]
        hits[row] = [x in gt for x in top]
        is_target[row] = [x == int(record["target_img_id"]) for x in top]
        num_gt[row] = len(gt)
    precision = np.cumsum(hits, axis=1) / np.arange(1, kmax + 1)
    gains = precision * hits
    out: dict[str, float] = {}
    for k in ks:
        out[f"map@{k}"] = float(np.mean(gains[:, :k].sum(1) / np.minimum(num_gt, k)))
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(is_target[:, :k].any(1)))
    if semantic_aspects:
        ap10 = gains[:, :SEMANTIC_K].sum(1) / np.minimum(num_gt, SEMANTIC_K)
        rows_by_aspect: dict[str, list[int]] = {}
        for row, record in enumerate(records):
            for aspect in record.get("semantic_aspects") or ():
                rows_by_aspect.setdefault(str(aspect), []).append(row)
        for aspect in sorted(rows_by_aspect):
            out[f"aspect/{aspect}/map@{SEMANTIC_K}"] = float(np.mean(ap10[rows_by_aspect[aspect]]))
    return out


def write_circo_submission(
    path: Path | str,
    predictions: Mapping[Any, Sequence[Any]],
    *,
    annotations: Annotations | None = None,
) -> Path:
    """Write the CIRCO server's file ``{"<query id>": [top-50 COCO ids]}`` atomically.

    With ``annotations`` the file is checked to cover exactly the annotated queries (the server requires
    all of them).
    """
    by_id = _by_int_key(predictions, what="CIRCO predictions")
    if annotations is not None:
        records = _load(annotations, what="CIRCO")
        _check_coverage(
            by_id, [_int_id(r.get("id"), what="CIRCO annotation 'id'") for r in records], what="CIRCO"
        )
    payload: dict[str, list[int]] = {}
    for qid in sorted(by_id):
        ranking = [_int_id(x, what=f"CIRCO query {qid} prediction") for x in by_id[qid]]
        _check_unique(ranking, what=f"CIRCO query {qid}")
        _check_length(ranking, CIRCO_TOP, what=f"CIRCO query {qid}")
        payload[str(qid)] = ranking[:CIRCO_TOP]
    return atomic_write_json(path, payload)


# ----------------------------------------------------------------------------------------------- CIRR
def _cirr_records(annotations: Annotations) -> list[tuple[int, Mapping[str, Any]]]:
    out = []
    for record in _load(annotations, what="CIRR"):
        for field in ("pairid", "reference", "img_set"):
            if field not in record:
                raise DataError(f"CIRR annotation {dict(record)!r:.120}: missing field {field!r}")
        out.append((_int_id(record["pairid"], what="CIRR 'pairid'"), record))
    return out


def _without_reference(ranking: Sequence[N], reference: N, *, pairid: int) -> list[N]:
    _check_unique(ranking, what=f"CIRR pairid {pairid}")
    return [x for x in ranking if x != reference]


def cirr_subset_ranking(
    ranking: Sequence[N], *, reference: N, members: Sequence[N], pairid: int = -1
) -> list[N]:
    """The ``img_set`` members other than the reference, in the order they appear in ``ranking``.

    Every such member must be in ``ranking`` (the subset protocol ranks all of them).
    """
    subset = {m for m in members if m != reference}
    ordered = [x for x in ranking if x in subset]
    if len(ordered) != len(subset):
        missing = sorted(str(m) for m in subset.difference(ordered))
        raise DataError(
            f"CIRR pairid {pairid}: ranking lacks img_set members {missing}; rank the whole gallery "
            "(or at least every member) for Recall_subset"
        )
    return ordered


def cirr_metrics(
    rankings: Mapping[Any, Sequence[str]],
    annotations: Annotations,
    *,
    ks: Sequence[int] = (1, 5, 10, 50),
    subset_ks: Sequence[int] = (1, 2, 3),
) -> dict[str, float]:
    """CIRR Recall@K (reference removed) and Recall_subset@K, as the CIRR evaluation server.

    Args:
        rankings: pairid (int or its digits) -> gallery image names, best first. The reference image is
            removed here if present; what is left must hold at least ``max(ks)`` names (51 for a ranking
            that still holds the reference) and every ``img_set`` member.
        annotations: ``captions/cap.rc2.val.json`` or its loaded list.
        ks, subset_ks: cut-offs; empty ``subset_ks`` skips Recall_subset.

    Returns:
        ``{"recall@1": ..., ..., "recall_subset@1": ..., ...}`` as fractions.
    """
    ks = _check_ks(ks, name="cirr_metrics ks")
    subset_ks = [int(k) for k in subset_ks]
    if any(k <= 0 for k in subset_ks):
        raise ConfigError(f"cirr_metrics subset_ks must be positive integers, got {subset_ks!r}")
    records = _cirr_records(annotations)
    by_id = _by_int_key(rankings, what="CIRR rankings")
    _check_coverage(by_id, [pid for pid, _ in records], what="CIRR rankings")
    kmax = max(ks)
    positions = np.empty(len(records))
    subset_positions = np.empty(len(records))
    for row, (pairid, record) in enumerate(records):
        target = record.get("target_hard")
        if target is None:
            raise DataError(f"CIRR pairid {pairid}: annotations lack 'target_hard' (test split?)")
        ranking = _without_reference(by_id[pairid], record["reference"], pairid=pairid)
        _check_length(ranking, kmax, what=f"CIRR pairid {pairid}", note=" after removing the reference")
        positions[row] = _position(ranking, target, kmax)
        if subset_ks:
            subset = cirr_subset_ranking(
                ranking, reference=record["reference"], members=record["img_set"]["members"], pairid=pairid
            )
            subset_positions[row] = _position(subset, target, len(subset))
    out = {f"recall@{k}": v for k, v in _recall_at_ks(positions, ks).items()}
    if subset_ks:
        out.update({f"recall_subset@{k}": v for k, v in _recall_at_ks(subset_positions, subset_ks).items()})
    return out


def write_cirr_submission(
    path: Path | str,
    rankings: Mapping[Any, Sequence[str]],
    annotations: Annotations,
    *,
    kind: Literal["recall", "recall_subset"] = "recall",
) -> Path:
    """Write a CIRR server file ``{"version": "rc2", "metric": kind, "<pairid>": [names]}`` atomically.

    ``kind="recall"`` writes the top 50 of each ranking after removing the reference; ``"recall_subset"``
    the top 3 of the subset ranking (see ``cirr_subset_ranking``). Every annotated pairid must be ranked.
    """
    if kind not in ("recall", "recall_subset"):
        raise ConfigError(f"CIRR submission kind {kind!r} is not valid; choose 'recall' or 'recall_subset'")
    records = _cirr_records(annotations)
    by_id = _by_int_key(rankings, what="CIRR rankings")
    _check_coverage(by_id, [pid for pid, _ in records], what="CIRR rankings")
    payload: dict[str, Any] = {"version": CIRR_SUBMISSION_VERSION, "metric": kind}
    for pairid, record in records:
        ranking = _without_reference(by_id[pairid], record["reference"], pairid=pairid)
        if kind == "recall":
            _check_length(
                ranking, CIRR_TOP_RECALL, what=f"CIRR pairid {pairid}", note=" after removing the reference"
            )
            payload[str(pairid)] = list(ranking[:CIRR_TOP_RECALL])
        else:
            subset = cirr_subset_ranking(
                ranking, reference=record["reference"], members=record["img_set"]["members"], pairid=pairid
            )
            _check_length(subset, CIRR_TOP_SUBSET, what=f"CIRR pairid {pairid} subset")
            payload[str(pairid)] = subset[:CIRR_TOP_SUBSET]
    return atomic_write_json(path, payload)


# ----------------------------------------------------------------------------------------------- FashionIQ
def _fiq_rankings(
    rankings: Mapping[int, Sequence[str]] | Sequence[Sequence[str]], n: int, *, category: str
) -> list[Sequence[str]]:
    if isinstance(rankings, Mapping):
        by_id = _by_int_key(rankings, what=f"FashionIQ {category} rankings")
        _check_coverage(by_id, list(range(n)), what=f"FashionIQ {category} rankings")
        return [by_id[i] for i in range(n)]
    if len(rankings) != n:
        raise DataError(f"FashionIQ {category}: {len(rankings)} rankings for {n} annotated triplets")
    return list(rankings)


def fashioniq_recall(
    rankings_by_category: Mapping[str, Mapping[int, Sequence[str]] | Sequence[Sequence[str]]],
    annotations_by_category: Mapping[str, Annotations],
    *,
    ks: Sequence[int] = (10, 50),
    gallery_sizes: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """FashionIQ Recall@K per category, their average, and ``average`` = mean of the averaged R@K.

    Args:
        rankings_by_category: category -> rankings (asins, best first; the reference is *not* removed, as in
            the FashionIQ/CLIP4Cir protocol), one per triplet in caption-file order, as a list or a mapping
            from the triplet index (``FashionIQTriplet.query_id``).
        annotations_by_category: category -> ``cap.<category>.val.json`` or its loaded list.
        ks: cut-offs; papers report 10 and 50.
        gallery_sizes: category -> images in its gallery. A ranking of a whole gallery smaller than ``max(ks)``
            is complete (R@K for K beyond the gallery counts the target wherever it is ranked); without the
            size a short ranking is refused, since it may be a truncated one.

    Returns:
        ``{"dress/recall@10": ..., ..., "average/recall@10": ..., "average": ...}`` as fractions.
    """
    ks = _check_ks(ks, name="fashioniq_recall ks")
    if set(rankings_by_category) != set(annotations_by_category) or not rankings_by_category:
        raise DataError(
            f"FashionIQ: rankings cover categories {sorted(rankings_by_category)} but annotations cover "
            f"{sorted(annotations_by_category)}; they must match and be non-empty"
        )
    kmax = max(ks)
    out: dict[str, float] = {}
    for category in rankings_by_category:
        records = _load(annotations_by_category[category], what=f"FashionIQ {category}")
        rankings = _fiq_rankings(rankings_by_category[category], len(records), category=category)
        need, note = kmax, ""
        if gallery_sizes is not None and category in gallery_sizes:
            need = min(kmax, int(gallery_sizes[category]))
            note = f" (gallery of {gallery_sizes[category]})"
        positions = np.empty(len(records))
        for i, (record, ranking) in enumerate(zip(records, rankings)):
            target = record.get("target")
            if target is None:
                raise DataError(f"FashionIQ {category} triplet {i}: annotation lacks 'target' (test split?)")
            _check_unique(ranking, what=f"FashionIQ {category} triplet {i}")
            _check_length(ranking, need, what=f"FashionIQ {category} triplet {i}", note=note)
            positions[i] = _position(ranking, target, kmax)
        for k, value in _recall_at_ks(positions, ks).items():
            out[f"{category}/recall@{k}"] = value
    categories = list(rankings_by_category)
    for k in ks:
        out[f"average/recall@{k}"] = float(np.mean([out[f"{c}/recall@{k}"] for c in categories]))
    out["average"] = float(np.mean([out[f"average/recall@{k}"] for k in ks]))
    return out


# ----------------------------------------------------------------------------------------------- ranking
def rank_gallery(
    query_features: torch.Tensor | np.ndarray,
    gallery_features: torch.Tensor | np.ndarray,
    gallery_names: Sequence[N],
    *,
    top_n: int | None = 50,
    exclude: Sequence[N | None] | None = None,
    chunk_size: int = 1024,
    progress: bool = False,
) -> list[list[N]]:
    """Rank the gallery for every query by dot-product similarity, best first.

    Queries are scored ``chunk_size`` at a time (``chunk_size * G`` scores in memory), with ``torch.topk``
    rather than a full sort. ``exclude[q]`` (e.g. the CIRR reference image) is dropped from query ``q``'s
    ranking, which then still holds ``top_n`` names (``None`` = the whole gallery). Equal scores come in
    ``torch.topk``'s order. Features should be L2-normalised so the score is the cosine similarity.
    """
    q = torch.as_tensor(query_features).float()
    g = torch.as_tensor(gallery_features).float().to(q.device)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(
            f"rank_gallery needs [Q, D] and [G, D] features, got {tuple(q.shape)} and {tuple(g.shape)}"
        )
    require_finite(q, what="rank_gallery query_features")
    require_finite(g, what="rank_gallery gallery_features")
    names = list(gallery_names)
    if len(names) != g.shape[0]:
        raise ValueError(f"rank_gallery: {len(names)} gallery names for {g.shape[0]} gallery features")
    index = {name: i for i, name in enumerate(names)}
    if len(index) != len(names):
        raise ValueError("rank_gallery: gallery names must be unique")
    if exclude is not None and len(exclude) != q.shape[0]:
        raise ValueError(f"rank_gallery: {len(exclude)} names to exclude for {q.shape[0]} queries")
    if chunk_size <= 0:
        raise ConfigError(f"rank_gallery chunk_size must be positive, got {chunk_size}")
    n_gallery = len(names)
    wanted = n_gallery if top_n is None else min(int(top_n), n_gallery)
    take = min(wanted + (1 if exclude is not None else 0), n_gallery)
    out: list[list[N]] = []
    starts = range(0, q.shape[0], chunk_size)
    for start in tqdm(starts, desc="rank gallery", unit="chunk", disable=not progress):
        scores = q[start : start + chunk_size] @ g.T
        masked: list[int] = []
        if exclude is not None:
            for row, name in enumerate(exclude[start : start + chunk_size]):
                col = index.get(name) if name is not None else None
                masked.append(-1 if col is None else col)
                if col is not None:
                    scores[row, col] = float("-inf")
        top = torch.topk(scores, take, dim=1).indices.cpu().tolist()
        for row, cols in enumerate(top):
            if masked and masked[row] >= 0:
                cols = [c for c in cols if c != masked[row]]
            out.append([names[c] for c in cols[:wanted]])
    return out
