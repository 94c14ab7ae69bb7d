"""``capret-eval map --query-features ...`` (source: saved features): mAP / MAP@R / R@k of saved embeddings and labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from capret.cli.eval.common import flags_where, search_flags
from capret.cli.eval.map_config import MapEvalConfig
from capret.config import ConfigError
from capret.errors import DataError, MissingFileError

FEATURE_FLAGS = (
    ("--query-features", "query_features"),
    ("--gallery-features", "gallery_features"),
    ("--query-labels", "query_labels"),
    ("--gallery-labels", "gallery_labels"),
)


def _load_npy(path: Path, *, flag: str) -> np.ndarray:
    if not path.is_file():
        raise MissingFileError(f"{flag}: file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{flag}: {path} is not a plain .npy array ({exc})") from None


def read_image_list(path: Path, *, flag: str) -> list[tuple[str, tuple[float, ...] | None]]:
    """One image per line: ``PATH`` or ``PATH x1 y1 x2 y2`` (whitespace-separated; the box crops the item).

    Relative paths are taken relative to the list file's folder.
    """
    if not path.is_file():
        raise MissingFileError(f"{flag}: file not found: {path}")
    refs: list[tuple[str, tuple[float, ...] | None]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.split()
        bbox: tuple[float, ...] | None = None
        if len(parts) >= 5:
            try:
                bbox = tuple(float(v) for v in parts[-4:])
                parts = parts[:-4]
            except ValueError:
                bbox = None
        image = Path(" ".join(parts))
        if not image.is_absolute():
            image = path.parent / image
        if bbox is not None and (bbox[2] <= bbox[0] or bbox[3] <= bbox[1]):
            raise DataError(
                f"{flag}: {path} line {number}: box {bbox} must be x1 y1 x2 y2 with x2 > x1, y2 > y1"
            )
        refs.append((str(image), bbox))
    return refs


def run(args: MapEvalConfig) -> dict[str, Any]:
    """Evaluate saved features; ``--rerank`` reports before/after; ``--out`` writes metrics.json and pictures."""
    from capret.evaluation.retrieval_eval import retrieve_and_evaluate

    missing = flags_where({flag: getattr(args, attr) for flag, attr in FEATURE_FLAGS}, given=False)
    if missing:
        raise ConfigError(f"--metric map with saved features needs {', '.join(missing)} (.npy files)")
    arrays = {attr: _load_npy(getattr(args, attr), flag=flag) for flag, attr in FEATURE_FLAGS}
    query_images = read_image_list(args.query_images, flag="--query-images") if args.query_images else None
    gallery_images = (
        read_image_list(args.gallery_images, flag="--gallery-images") if args.gallery_images else None
    )
    for refs, key, flag in (
        (query_images, "query_features", "--query-images"),
        (gallery_images, "gallery_features", "--gallery-images"),
    ):
        if refs is not None and len(refs) != len(arrays[key]):
            raise DataError(f"{flag} lists {len(refs)} images but there are {len(arrays[key])} feature rows")
    if args.rerank == "geometric" and (query_images is None or gallery_images is None):
        raise ConfigError("--rerank geometric needs --query-images and --gallery-images")
    evaluation = retrieve_and_evaluate(
        arrays["query_features"],
        arrays["gallery_features"],
        arrays["query_labels"],
        arrays["gallery_labels"],
        ks=args.ks,
        **search_flags(args),
        query_images=query_images,
        gallery_images=gallery_images,
    )
    result: dict[str, Any] = {"metric": "map", "index": args.index, **evaluation.metrics}
    if args.out is None:
        return result

    from capret.evaluation.visualize import plot_recall_curve, plot_retrieval_grid

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ks = sorted(set(args.ks))
    if "before" in evaluation.metrics:
        curves = {
            name: {k: evaluation.metrics[name][f"recall@{k}"] for k in ks} for name in ("before", "after")
        }
    else:
        curves = {"recall@k": {k: evaluation.metrics[f"recall@{k}"] for k in ks}}
    pictures = {"recall_png": str(plot_recall_curve(out / "recall_at_k.png", curves))}
    if query_images is not None and gallery_images is not None:
        ql = np.asarray(arrays["query_labels"]).reshape(-1)
        gl = np.asarray(arrays["gallery_labels"]).reshape(-1)
        hits = gl[evaluation.ranking] == ql[:, None]
        pictures["grid_png"] = str(
            plot_retrieval_grid(
                out / "retrieval_grid.png",
                query_images=query_images,
                gallery_images=gallery_images,
                ranking=evaluation.ranking,
                hits=hits,
                k=min(5, evaluation.ranking.shape[1]),
            )
        )
    result.update(pictures)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
