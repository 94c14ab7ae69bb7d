"""Pictures of retrieval results: a query/top-k grid with hits and misses outlined, and recall@k curves.

matplotlib runs on the non-interactive Agg backend, so these work on headless servers and in tests. Images are
given as ``(path, bbox_xyxy | None)`` references (the reranker contract) and cropped to the item when a box is
given; an image that cannot be opened is drawn as a grey tile with its file name, so one missing file never
loses the whole picture.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

__all__ = ["ImageRef", "load_tile", "plot_retrieval_grid", "plot_recall_curve"]

ImageRef = tuple[str | os.PathLike[str], Sequence[float] | None]

HIT_COLOUR = "#1a9850"
MISS_COLOUR = "#d73027"


def load_tile(ref: ImageRef, *, size: int = 128) -> np.ndarray:
    """The (cropped) image of ``ref`` letterboxed into a ``size x size`` RGB array; grey if unreadable."""
    path, bbox = ref
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, ValueError):
        return np.full((size, size, 3), 200, dtype=np.uint8)
    if bbox is not None:
        x1, y1, x2, y2 = (float(v) for v in bbox)
        left, top = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        right = min(image.width, max(left + 1, int(np.ceil(x2))))
        bottom = min(image.height, max(top + 1, int(np.ceil(y2))))
        image = image.crop((left, top, right, bottom))
    image.thumbnail((size, size))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return np.asarray(canvas)


def _outline(ax: plt.Axes, colour: str, width: float = 4.0) -> None:
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def plot_retrieval_grid(
    path: str | os.PathLike[str],
    *,
    query_images: Sequence[ImageRef],
    gallery_images: Sequence[ImageRef],
    ranking: np.ndarray,
    hits: np.ndarray,
    query_indices: Sequence[int] | None = None,
    k: int = 5,
    max_queries: int = 8,
    title: str | None = None,
) -> Path:
    """One row per query: the query crop, then its top-``k`` gallery crops outlined green (hit) or red (miss).

    Args:
        path: PNG to write.
        query_images: ``(path, bbox | None)`` per query.
        gallery_images: ``(path, bbox | None)`` per gallery item.
        ranking: ``[Q, >=k]`` gallery indices, best first.
        hits: ``[Q, >=k]`` bool, ``hits[q, i]`` = the i-th result of query q is relevant.
        query_indices: which queries to show (default: the first ``max_queries``).
        k: results per row.
        max_queries: rows when ``query_indices`` is not given.
        title: figure title.
    """
    ranking = np.asarray(ranking)
    hits = np.asarray(hits, dtype=bool)
    if ranking.ndim != 2 or hits.shape != ranking.shape:
        raise ValueError(f"ranking {ranking.shape} and hits {hits.shape} must be equal [Q, K] arrays")
    if len(query_images) != ranking.shape[0]:
        raise ValueError(f"{len(query_images)} query images for {ranking.shape[0]} ranked queries")
    k = min(k, ranking.shape[1])
    rows = (
        list(query_indices) if query_indices is not None else list(range(min(max_queries, ranking.shape[0])))
    )
    if not rows:
        raise ValueError("no query to draw")
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.6 * (k + 1), 1.75 * len(rows)), squeeze=False)
    for r, q in enumerate(rows):
        ax = axes[r, 0]
        ax.imshow(load_tile(query_images[q]))
        ax.set_xticks([])
        ax.set_yticks([])
        _outline(ax, "#4575b4", 3.0)
        ax.set_title(f"query {q}", fontsize=7)
        for i in range(k):
            ax = axes[r, i + 1]
            g = int(ranking[q, i])
            ax.imshow(load_tile(gallery_images[g]))
            ax.set_xticks([])
            ax.set_yticks([])
            _outline(ax, HIT_COLOUR if hits[q, i] else MISS_COLOUR)
            ax.set_title(f"#{i + 1} g{g}", fontsize=7)
    fig.suptitle(title or f"top-{k} retrieval (green = same identity, red = different)", fontsize=9)
    return _save(fig, path)


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns its path."""
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_recall_curve(
    path: str | os.PathLike[str],
    curves: Mapping[str, Mapping[int, float]],
    *,
    title: str = "recall@k",
) -> Path:
    """Recall (fraction) against k for one or more named runs, e.g. ``{"before": {1: .3, 5: .5}, "after": ...}``."""
    if not curves:
        raise ValueError("no curve to draw")
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, points in curves.items():
        ks = sorted(int(k) for k in points)
        ax.plot(ks, [100.0 * points[k] for k in ks], marker="o", label=name)
        for k in ks:
            ax.annotate(
                f"{100.0 * points[k]:.1f}",
                (k, 100.0 * points[k]),
                fontsize=6,
                textcoords="offset points",
                xytext=(0, 4),
            )
    max_k = max(int(k) for points in curves.values() for k in points)
    ax.set_xlim(0, max_k * 1.1 + 0.5)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)
