"""Quickstart stage ``pipeline``: leave a ready pipeline folder ``OUT/pipeline`` and check it end to end.

The folder holds ``pipeline.json`` (the trained dual-stream model of the ``dual_stream`` stage, the template
captioner, no reranker, and the demo clothing detector of the ``detector`` stage — or the whole image when that
stage did not run; boxes can also be given per query) and ``gallery/``: the demo
validation shop photos indexed by ``capret index build``'s library path, with their items taken from a COCO
results file (``gallery_boxes.json``) made of the shop boxes *without* categories, so no annotation field reaches
a caption. Right after the quickstart::

    capret search --pipeline OUT/pipeline --image OUT/world/deepfashion2/validation/image/000004.jpg --box x1,y1,x2,y2

The stage searches the validation query items (:data:`QUERIES`; their ground-truth boxes given as the query
item) and reports how often the right shop item is first / in the top 20, and the median milliseconds per stage;
with the quickstart's detector it also searches the same photos with the detector's own boxes (``top1`` /
``top20``; ``top1_given_boxes`` / ``top20_given_boxes`` are the given-box figures).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capret.errors import UsageError
from capret.evaluation.deepfashion2 import coco_iou
from capret.quickstart import QuickstartContext

__all__ = ["QUERIES", "run"]

#: validation queries searched by the stage, spread over the split; None = every query item of the split (114 in
#: the quickstart's world: about 0.1 s each with both searches, where the 12 of earlier versions moved top-1 by
#: 0.083 per photo and swung from 0.17 to 0.42 between two runs)
QUERIES: int | None = None


def _model_dir(ctx: QuickstartContext) -> Path:
    state = ctx.state.get("dual_stream")
    model_dir = (
        Path(state["model_dir"])
        if isinstance(state, dict) and "model_dir" in state
        else ctx.out_dir / "model"
    )
    if not (model_dir / "capret_model.json").is_file():
        raise UsageError(
            f"the pipeline stage needs the trained model of the dual_stream stage in {model_dir}; run that stage first"
        )
    return model_dir


def _detector_dir(ctx: QuickstartContext) -> Path | None:
    """The demo detector of the ``detector`` stage (this run's, else one left in OUT/detector), or None."""
    state = ctx.state.get("detector")
    folder = Path(state) if state is not None else ctx.out_dir / "detector"
    return folder if folder.is_dir() and any(folder.iterdir()) else None


def _where(path: str | Path) -> str:
    """One spelling of a file's location (the gallery answers paths under its recorded root)."""
    return str(Path(path).resolve())


def run(ctx: QuickstartContext) -> dict[str, Any]:
    """Build ``OUT/pipeline`` (gallery + pipeline.json) and search demo queries with it."""
    from capret.quickstart.dual_stream import fastest_thread_count

    threads = torch.get_num_threads()
    # one query at a time is latency-bound: on a shared CPU extra OpenMP threads can make it ten times slower
    torch.set_num_threads(fastest_thread_count())
    try:
        return _build_and_search(ctx)
    finally:
        torch.set_num_threads(threads)


def _build_and_search(ctx: QuickstartContext) -> dict[str, Any]:
    from capret.data.deepfashion2 import gt_box_protocol, image_path, load_items
    from capret.inference.detectors import CocoResultsDetector
    from capret.inference.dualstream.encoding import load_model
    from capret.inference.query.captioner import Captioner
    from capret.inference.query.gallery import build_gallery, finish_gallery
    from capret.inference.query.pipeline import PipelineConfig, RetrievalPipeline
    from captioning.backends import create_backend

    model_dir = _model_dir(ctx)
    split = "validation"
    queries, gallery = gt_box_protocol(load_items(ctx.data_root, split, progress=False))
    pipe_dir = ctx.out_dir / "pipeline"
    if pipe_dir.exists():  # the model may have been retrained: rebuild the (small) gallery from scratch
        shutil.rmtree(pipe_dir)
    pipe_dir.mkdir(parents=True)

    boxes = pipe_dir / "gallery_boxes.json"
    boxes.write_text(
        json.dumps(
            [
                {
                    "image_id": it.image_id,
                    "bbox": [it.bbox[0], it.bbox[1], it.bbox[2] - it.bbox[0], it.bbox[3] - it.bbox[1]],
                    "score": 1.0,
                }
                for it in gallery.items
            ]
        )
    )
    image_ids = sorted({it.image_id for it in gallery.items})
    model = load_model(model_dir)
    captioner = Captioner(create_backend("template"), cache=pipe_dir / "gallery" / "captions.jsonl")
    built = build_gallery(
        model,
        images=[image_path(ctx.data_root, split, i) for i in image_ids],
        ids=[f"{i:06d}" for i in image_ids],
        out=pipe_dir / "gallery",
        detector=CocoResultsDetector(path=boxes),
        captioner=captioner,
        model_ref=str(model_dir),
        progress=False,
        image_root=image_path(ctx.data_root, split, 0).parent,  # stored relative: a copied OUT still works
    )
    captioner.close()
    finish_gallery(pipe_dir / "gallery", index="flat", settings={"model": str(model_dir)}, progress=False)
    detector_dir = _detector_dir(ctx)
    detector = None
    if detector_dir is not None:
        detector = {
            "name": "deepfashion2_detector",
            "options": {"path": os.path.relpath(detector_dir, pipe_dir)},
        }
    PipelineConfig(
        model=os.path.relpath(model_dir, pipe_dir),
        gallery="gallery",
        detector=detector,
        captioner={"backend": "template"},
        max_items=2,
    ).save(pipe_dir)

    pipeline = RetrievalPipeline.load(pipe_dir)
    label_of = {
        (_where(image_path(ctx.data_root, split, it.image_id)), tuple(float(v) for v in it.bbox)): int(label)
        for it, label in zip(gallery.items, gallery.labels)
    }
    count = len(queries.items) if QUERIES is None else min(QUERIES, len(queries.items))
    step = max(1, len(queries.items) // max(count, 1))
    chosen = list(range(0, len(queries.items), step))[:count]
    first = top20 = detected_first = detected_top20 = 0
    timings: dict[str, list[float]] = {}
    for q in chosen:
        item = queries.items[q]
        photo = image_path(ctx.data_root, split, item.image_id)
        matches = pipeline.search(photo, k=20, boxes=[item.bbox])
        labels = [label_of.get((_where(m.image), tuple(m.box or ())), -1) for m in matches]
        first += bool(labels) and labels[0] == int(queries.labels[q])
        top20 += int(queries.labels[q]) in labels
        if detector is not None:
            # the shop list of the detected item that overlaps the query item most (IoU >= 0.5), as a user
            # clicking that garment in the photo would get it
            found = pipeline.search(photo, k=20)
            overlap = {
                tuple(m.query_box): float(coco_iou(np.asarray(m.query_box), np.asarray(item.bbox)))
                for m in found
            }
            best = max(overlap, key=lambda box: overlap[box], default=None)
            if best is not None and overlap[best] >= 0.5:
                mine = [
                    label_of.get((_where(m.image), tuple(m.box or ())), -1)
                    for m in found
                    if tuple(m.query_box) == best
                ]
                detected_first += bool(mine) and mine[0] == int(queries.labels[q])
                detected_top20 += int(queries.labels[q]) in mine
        for stage, ms in pipeline.last_timings.items():
            timings.setdefault(stage, []).append(ms)
    pipeline.close()
    example = queries.items[chosen[0]]
    x1, y1, x2, y2 = (round(v) for v in example.bbox)
    return {
        "pipeline_dir": str(pipe_dir),
        "gallery_items": int(built["items"]),
        "queries": len(chosen),
        # with the detector's own boxes (the photo-to-shop-list figure); the given-box figures isolate retrieval
        "top1": detected_first / len(chosen) if detector is not None else None,
        "top20": detected_top20 / len(chosen) if detector is not None else None,
        "top1_given_boxes": first / len(chosen),
        "top20_given_boxes": top20 / len(chosen),
        "detector": str(detector_dir) if detector_dir is not None else "whole image",
        "torch_threads": torch.get_num_threads(),
        "median_ms": {stage: round(float(np.median(v)), 2) for stage, v in timings.items()},
        "serve_command": f"capret serve --pipeline {pipe_dir}",
        "example_command": (
            f"capret search --pipeline {pipe_dir} --image {image_path(ctx.data_root, split, example.image_id)} "
            f"--box {x1},{y1},{x2},{y2}"
        ),
    }
