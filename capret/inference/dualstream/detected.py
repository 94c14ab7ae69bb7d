"""The official DeepFashion2 consumer-to-shop protocol from raw images: detect, caption, embed, search, score.

The published numbers (Match R-CNN top-1 .192 / top-20 .524) rank *detections*: every user (query) image and
every shop (gallery) image goes through a detector, each detected item is embedded, each query detection
retrieves shop detections, and the official evaluator matches query detections to annotated items and
retrieved boxes to the right shop items by IoU. :func:`evaluate_detected` runs that path:

1. **detect** — a :class:`~capret.inference.detectors.Detector` on the decoded images, or a file-keyed detector
   (:class:`~capret.inference.detectors.CocoResultsDetector`: the COCO results of detectron2 / mmdetection);
2. **caption** — each detection is captioned by a captioning backend through the captioning loop
   (:func:`captioning.runner.caption_targets`), into a caption store keyed by split, image and box
   (:func:`detection_key`), so a rerun or another model reuses them; the backend sees pixels and the detector's
   predicted category, never an annotation;
3. **embed** — the dual-stream model embeds each detection's crop with its caption, through the same item path
   (:func:`~capret.inference.dualstream.encoding.encode_items`) as the ground-truth-box protocol;
4. **search** — a :mod:`capret.retrieval.index` backend over all gallery detections, then optionally a
   reranker on the top ``rerank_topk``;
5. **score** — the official results file (:func:`~capret.evaluation.deepfashion2.write_retrieval_results`) and
   its top-k (:func:`~capret.evaluation.deepfashion2.evaluate_retrieval_results`).

Which images are queries and which gallery comes from the ``source`` field of the split's annotation files (the
split's definition); boxes, classes, captions and features come only from the detector and the pixels. With the
ground-truth boxes of the ground-truth-box protocol as detections (:func:`ground_truth_detections`: score 1,
their class) the result equals that protocol's official top-k exactly (``tests/inference/dualstream/test_detected_protocol.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from capret.data.deepfashion2 import (
    CATEGORIES,
    Item,
    build_retrieval_ground_truth,
    gt_box_protocol,
    image_path,
    load_items,
    open_image,
)
from capret.errors import DataError
from capret.evaluation.deepfashion2 import evaluate_retrieval_results, write_retrieval_results
from capret.inference.detectors import Detection, FileDetector
from capret.io import atomic_write_json

__all__ = [
    "DetectedProtocolResult",
    "SplitDetections",
    "caption_detections",
    "detect_split",
    "detection_key",
    "evaluate_detected",
    "ground_truth_detections",
]


@dataclass
class SplitDetections:
    """The detections of one side of a split, flattened: row ``i`` is ``detections[i]`` of ``image_ids[i]``."""

    image_ids: list[int] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.detections)

    def items(self, *, source: str) -> list[Item]:
        """Pseudo-items carrying only what the detector said (box, predicted class): no annotation field."""
        return [
            Item(
                image_id=image_id,
                item_index=row,
                source=source,
                pair_id=0,
                style=0,
                category_id=int(det.category_id or 0),
                category_name=CATEGORIES.get(int(det.category_id or 0), ""),
                bbox=tuple(float(v) for v in det.box),  # type: ignore[arg-type]
            )
            for row, (image_id, det) in enumerate(zip(self.image_ids, self.detections))
        ]


@dataclass
class DetectedProtocolResult:
    """Metrics and artefacts of :func:`evaluate_detected`."""

    metrics: dict[str, Any]
    results_path: Path
    query: SplitDetections
    gallery: SplitDetections
    query_features: np.ndarray
    gallery_features: np.ndarray


def detection_key(split: str, image_id: int, box: Sequence[float]) -> str:
    """Caption-store key of a detection: split, image and box (1/10 pixel), so equal boxes share a caption."""
    coords = "_".join(f"{float(v):.1f}" for v in box)
    return f"deepfashion2-detections/{split}/{image_id:06d}/{coords}"


def ground_truth_detections(root: str | Path, split: str) -> list[dict[str, Any]]:
    """COCO results that are the ground-truth-box protocol's items (user and shop, style > 0): score 1, true class.

    Fed back as ``--detections`` they reproduce that protocol's official top-k, the check of the detected path.
    """
    queries, gallery = gt_box_protocol(load_items(root, split, progress=False))
    return [
        {
            "image_id": it.image_id,
            "category_id": it.category_id,
            "bbox": [it.bbox[0], it.bbox[1], it.bbox[2] - it.bbox[0], it.bbox[3] - it.bbox[1]],
            "score": 1.0,
        }
        for it in sorted(queries.items + gallery.items, key=lambda it: (it.image_id, it.item_index))
    ]


def detect_split(
    detector: Any,
    *,
    root: str | Path,
    split: str,
    image_ids: Sequence[int],
    batch_size: int = 8,
    max_items: int | None = None,
    progress: bool = False,
) -> SplitDetections:
    """Run ``detector`` on the images ``image_ids`` of a split (file-keyed detectors read their files)."""
    out = SplitDetections()
    batches = [list(image_ids[i : i + batch_size]) for i in range(0, len(image_ids), batch_size)]
    for batch in tqdm(batches, desc=f"detect {split}", unit="batch", disable=not progress):
        if isinstance(detector, FileDetector):
            found = detector.detect_files([image_path(root, split, i) for i in batch])
        else:
            found = detector.detect([open_image(root, split, i) for i in batch])
        if len(found) != len(batch):
            raise ValueError(f"detector returned {len(found)} lists for {len(batch)} images")
        for image_id, dets in zip(batch, found):
            for det in list(dets)[:max_items]:
                out.image_ids.append(int(image_id))
                out.detections.append(det)
    return out


def caption_detections(
    sides: Sequence[SplitDetections],
    *,
    root: str | Path,
    split: str,
    backend: str = "template",
    backend_options: dict[str, Any] | None = None,
    store: str | Path,
    prompt_set: str = "capret-chat-v1",
    loop: dict[str, Any] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> list[list[str | None]]:
    """Caption every detection with a captioning backend, cached in the caption store ``store``.

    Already captioned keys are skipped (the store is resumable); a detection whose captioning failed gets
    ``None`` (the model's no-caption path) and is logged in the store's failures file.
    """
    from capret.config import from_dict
    from captioning.backends import create_backend
    from captioning.loop import LoopConfig
    from captioning.prompts import get_prompt_set
    from captioning.runner import caption_targets
    from captioning.sources import CaptionTarget
    from captioning.store import CaptionStore, read_captions

    keys = [
        [detection_key(split, i, d.box) for i, d in zip(side.image_ids, side.detections)] for side in sides
    ]
    targets: dict[str, CaptionTarget] = {}
    for side, side_keys in zip(sides, keys):
        for image_id, det, key in zip(side.image_ids, side.detections, side_keys):
            if key not in targets:
                category = CATEGORIES.get(int(det.category_id or 0), "")
                targets[key] = CaptionTarget(
                    key=key,
                    open_image=partial(open_image, root, split, image_id),
                    bbox=tuple(float(v) for v in det.box),  # type: ignore[arg-type]
                    category=category,  # the detector's prediction, not an annotation
                )
    config = from_dict(LoopConfig, loop or {})
    with create_backend(backend, **(backend_options or {})) as engine, CaptionStore(store) as cache:
        caption_targets(
            list(targets.values()),
            store=cache,
            backend=engine,
            prompts=get_prompt_set(prompt_set),
            config=config,
            batch_size=batch_size,
            progress=progress,
        )
    found = read_captions(store)
    return [[found.get(k) for k in side_keys] for side_keys in keys]


def _source_images(root: str | Path, split: str) -> tuple[list[int], list[int], list[Item]]:
    """Query (user) and gallery (shop) image ids of the split, from the annotations' ``source`` field."""
    items = load_items(root, split, progress=False)
    if not items:
        raise DataError("no annotated images", path=Path(root) / split / "annos")
    user = sorted({it.image_id for it in items if it.source == "user"})
    shop = sorted({it.image_id for it in items if it.source == "shop"})
    return user, shop, items


def _ground_truth(
    root: str | Path,
    split: str,
    items: list[Item],
    query_gt: str | Path | None,
    gallery_gt: str | Path | None,
) -> tuple[Any, Any]:
    """The official GT records: given files, else ``<root>/<split>/{query,gallery}_gt.json``, else built."""
    default_q, default_g = Path(root) / split / "query_gt.json", Path(root) / split / "gallery_gt.json"
    q = query_gt or (default_q if default_q.is_file() else None)
    g = gallery_gt or (default_g if default_g.is_file() else None)
    if q is not None and g is not None:
        return q, g
    built_q, built_g = build_retrieval_ground_truth(items)
    return q or built_q, g or built_g


def evaluate_detected(
    model: Any,
    detector: Any,
    *,
    root: str | Path,
    split: str,
    out_dir: str | Path,
    captions: str | None = "template",
    caption_options: dict[str, Any] | None = None,
    caption_store: str | Path | None = None,
    caption_loop: dict[str, Any] | None = None,
    query_gt: str | Path | None = None,
    gallery_gt: str | Path | None = None,
    ks: Sequence[int] = (1, 5, 10, 15, 20),
    top: int = 20,
    index: str = "exact",
    rerank: str | None = None,
    rerank_topk: int = 100,
    max_items: int | None = None,
    batch_size: int = 64,
    detect_batch_size: int = 8,
    progress: bool = False,
) -> DetectedProtocolResult:
    """Detect, caption, embed, search and score a split; writes ``results.json``, ``metrics.json``, ``detections.json``.

    Args:
        model: a :class:`~capret.inference.dualstream.encoding.RetrievalModel` (``load_model``).
        detector: a ``Detector`` (``detect(images)``) or ``FileDetector`` (``detect_files(paths)``).
        root: dataset root in the DeepFashion2 layout; ``split``: its split.
        out_dir: where ``results.json`` (official format), ``metrics.json`` and the caption store go.
        captions: a caption backend name (``template``, ``transformers``, ``openai``) or ``None`` (image only).
        caption_options: keyword options of the backend (e.g. ``base_url``, ``model`` for ``openai``).
        caption_store: caption cache (default ``<out_dir>/captions.jsonl``); reused across runs.
        caption_loop: :class:`captioning.loop.LoopConfig` overrides (``rounds``, ``view``, ...).
        query_gt: official ``query_gt.json`` (default: ``<root>/<split>/query_gt.json`` or built from annos).
        gallery_gt: official ``gallery_gt.json`` (same default).
        ks: official top-k cut-offs (each at most ``top``).
        top: retrieved shop detections written per query detection (the challenge asks for 20).
        index: search backend of :mod:`capret.retrieval.index`.
        rerank: a reranker name; reorders the top ``rerank_topk`` of every ranking.
        max_items: most detections kept per image (best first); ``None`` keeps the detector's list.
        batch_size: embedding batch size; ``detect_batch_size``: images per detector call.
    """
    from capret.inference.dualstream.encoding import encode_items
    from capret.retrieval.index import create_index

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ks = sorted({int(k) for k in ks})
    user_ids, shop_ids, items = _source_images(root, split)
    detect = partial(
        detect_split,
        detector,
        root=root,
        split=split,
        batch_size=detect_batch_size,
        max_items=max_items,
        progress=progress,
    )
    query, gallery = detect(image_ids=user_ids), detect(image_ids=shop_ids)
    top = min(top, len(gallery))  # a gallery smaller than the official 20 is listed whole
    if ks[-1] > top:
        raise DataError(
            f"max(ks) = {ks[-1]} exceeds the {top} retrievable gallery detections; lower --ks",
            path=Path(root) / split,
        )
    q_caps: list[str | None] | None = None
    g_caps: list[str | None] | None = None
    store = Path(caption_store) if caption_store is not None else out_dir / "captions.jsonl"
    if captions is not None:
        q_caps, g_caps = caption_detections(
            [query, gallery],
            root=root,
            split=split,
            backend=captions,
            backend_options=caption_options,
            store=store,
            loop=caption_loop,
            progress=progress,
        )

    def encode(side: SplitDetections, source: str, side_captions: list[str | None] | None) -> np.ndarray:
        if len(side) == 0:
            return np.zeros((0, model.embed_dim), dtype=np.float32)
        return encode_items(
            model.model,
            root=root,
            split=split,
            items=side.items(source=source),
            captions=side_captions,
            batch_size=batch_size,
            device=model.device,
            progress=progress,
        )

    q_feats, g_feats = encode(query, "user", q_caps), encode(gallery, "shop", g_caps)
    search = create_index(index, g_feats.shape[1])
    search.add(g_feats, np.arange(len(gallery), dtype=np.int64))
    depth = min(len(gallery), max(top, rerank_topk if rerank else 0))
    scores, ranking = (
        search.search(q_feats, depth)
        if len(query)
        else (np.zeros((0, depth)), np.zeros((0, depth), np.int64))
    )
    if rerank and len(query):
        from capret.retrieval.rerank import create_reranker

        k_r = min(rerank_topk, depth)

        def refs(side: SplitDetections) -> list[tuple[str, tuple[float, float, float, float]]]:
            return [(str(image_path(root, split, i)), d.box) for i, d in zip(side.image_ids, side.detections)]

        new_rank, _ = create_reranker(rerank).rerank(
            ranking=ranking[:, :k_r],
            scores=scores[:, :k_r],
            query_features=q_feats,
            gallery_features=g_feats,
            query_images=refs(query),
            gallery_images=refs(gallery),
        )
        ranking = np.concatenate([np.asarray(new_rank, dtype=np.int64), ranking[:, k_r:]], axis=1)
    g_img = np.asarray(gallery.image_ids, dtype=np.int64)
    g_box = np.asarray([d.box for d in gallery.detections], dtype=np.float64).reshape(-1, 4)
    head = ranking[:, :top]
    results_path = write_retrieval_results(
        out_dir / "results.json",
        query_image_ids=query.image_ids,
        query_bboxes=[d.box for d in query.detections],
        query_scores=[d.score for d in query.detections],
        query_cls=[int(d.category_id or 0) for d in query.detections],
        gallery_image_ids=g_img[head].reshape(len(query), top),
        gallery_bboxes=g_box[head].reshape(len(query), top, 4),
        top=top,
    )
    q_gt, g_gt = _ground_truth(root, split, items, query_gt, gallery_gt)
    official = evaluate_retrieval_results(results_path, q_gt, g_gt, ks=ks)
    metrics: dict[str, Any] = {
        "protocol": "deepfashion2",
        "source": "detections",
        "split": split,
        **{f"top{k}": official[f"top{k}"] for k in ks},
        "num_queries": official["num_queries"],
        "evaluated": official["evaluated"],
        "missed": official["missed"],
        "query_images": len(user_ids),
        "gallery_images": len(shop_ids),
        "query_detections": len(query),
        "gallery_detections": len(gallery),
        "captions": captions or "none",
        "caption_store": str(store) if captions is not None else None,
        "captions_missing": sum(c is None for c in (q_caps or []) + (g_caps or [])) if captions else None,
        "index": index,
        "rerank": rerank,
        "results": str(results_path),
    }
    atomic_write_json(out_dir / "metrics.json", metrics, indent=2)
    atomic_write_json(
        out_dir / "detections.json",
        {
            side: [{"image_id": i, **d.to_dict()} for i, d in zip(s.image_ids, s.detections)]
            for side, s in (("query", query), ("gallery", gallery))
        },
    )
    return DetectedProtocolResult(
        metrics=metrics,
        results_path=results_path,
        query=query,
        gallery=gallery,
        query_features=q_feats,
        gallery_features=g_feats,
    )
