"""Quickstart stage ``data``: build the embedded demo dataset (DeepFashion2 layout) under ``ctx.data_root``."""

from __future__ import annotations

from typing import Any

from capret.data.demo import DEMO_VERSION, build_demo_dataset, read_demo_marker
from capret.quickstart import QuickstartContext

#: Keys of the stage's report entry, all taken from the build summary.
REPORT_KEYS = (
    "train_images",
    "validation_images",
    "identities_train",
    "identities_validation",
    "query_items",
    "gallery_items",
)


def run(ctx: QuickstartContext) -> dict[str, Any]:
    """Build (or reuse) the demo dataset and hand the split folders and GT files to later stages.

    A completed build with the same seed and generator version is reused, so re-running the quickstart
    does not redo the data; anything else (no marker, other seed, older generator) is rebuilt from scratch.
    Sets ``ctx.state["splits"]`` (split name -> folder), ``ctx.state["query_gt"]`` and
    ``ctx.state["gallery_gt"]`` (paths of the validation ground-truth files).
    """
    marker = read_demo_marker(ctx.data_root)
    if marker is None or marker.get("seed") != ctx.seed or marker.get("version") != DEMO_VERSION:
        marker = build_demo_dataset(ctx.data_root, ctx.seed)
    ctx.state["splits"] = {split: ctx.data_root / split for split in ("train", "validation")}
    ctx.state["query_gt"] = ctx.data_root / "validation" / "query_gt.json"
    ctx.state["gallery_gt"] = ctx.data_root / "validation" / "gallery_gt.json"
    return {key: int(marker[key]) for key in REPORT_KEYS}
