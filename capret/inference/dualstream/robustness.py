"""How retrieval degrades with bad captions: mAP of a trained dual-stream model as a function of the share
of corrupted captions (:mod:`capret.evaluation.caption_corruption`), per corruption mode.

Every (mode, rate) re-embeds the split's ground-truth-box protocol items with the corrupted captions and scores
them with :func:`capret.inference.dualstream.encoding.evaluate_items`; rate 0 is computed once and shared by all modes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from capret.data.captions import load_caption_map
from capret.data.deepfashion2 import gt_box_protocol, load_items
from capret.errors import ConfigError
from capret.evaluation.caption_corruption import CORRUPTIONS, corrupt_caption_map
from capret.inference.dualstream.encoding import evaluate_items
from capret.models.dual_stream import DualStreamModel

__all__ = ["caption_corruption_sweep"]

#: metrics kept per (mode, rate)
_KEPT = ("map", "map_at_r", "recall@1", "recall@10")


def caption_corruption_sweep(
    model: DualStreamModel,
    *,
    root: str | Path,
    split: str,
    captions: str | Path,
    modes: Sequence[str] = CORRUPTIONS,
    rates: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
    seed: int = 0,
    ks: Sequence[int] = (1, 5, 10, 20),
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Retrieval metrics per corruption mode and rate.

    Queries and gallery items are corrupted alike (both sides are captioned by the same captioner).

    Returns:
        ``{"modes": {mode: [{"rate": r, "map": ..., "recall@1": ...}, ...]}, "rates": [...], "seed": s,
        "captioned_items": n}``; ``map`` of rate 0 is the uncorrupted result.
    """
    unknown = [m for m in modes if m not in CORRUPTIONS]
    if unknown:
        raise ConfigError(f"unknown caption corruption {unknown[0]!r}; valid: {', '.join(CORRUPTIONS)}")
    bad_rates = [r for r in rates if not 0.0 <= float(r) <= 1.0]
    if bad_rates:
        raise ConfigError(f"corruption rates must be in [0, 1], got {bad_rates[0]}")
    table = load_caption_map(captions)
    queries, gallery = gt_box_protocol(load_items(root, split, progress=False))
    keys = sorted({it.key for it in [*queries.items, *gallery.items]})
    cache: dict[tuple[str, float], dict[str, float]] = {}

    def score(mode: str, rate: float) -> dict[str, float]:
        cache_key = ("none", 0.0) if rate == 0.0 else (mode, rate)
        if cache_key not in cache:
            corrupted = corrupt_caption_map(table, keys, mode=mode, rate=rate, seed=seed)
            with warnings.catch_warnings():  # dropped captions are the point here, not a join problem
                warnings.simplefilter("ignore", UserWarning)
                # Rate 0 reads the store itself (its split binding and coverage are checked as usual); corrupted
                # maps drop captions on purpose, so their coverage is not held against them.
                result = evaluate_items(
                    model,
                    root=root,
                    split=split,
                    captions=captions if rate == 0.0 else corrupted,
                    ks=ks,
                    batch_size=batch_size,
                    device=device,
                    min_caption_coverage=0.5 if rate == 0.0 else 0.0,
                )
            cache[cache_key] = {k: float(result.metrics[k]) for k in _KEPT if k in result.metrics}
        return cache[cache_key]

    curves = {mode: [{"rate": float(rate), **score(mode, float(rate))} for rate in rates] for mode in modes}
    return {
        "modes": curves,
        "rates": [float(r) for r in rates],
        "seed": seed,
        "captioned_items": sum(k in table for k in keys),
        "items": len(keys),
    }
