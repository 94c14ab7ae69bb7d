"""Quickstart stage ``data``: the data set every later stage runs on.

The default world is the rendered garment world (:mod:`capret.data.garments`): DeepFashion2, FashionIQ and
image-text splits whose signal lives in the pixels, under ``ctx.world_root``. ``--world demo`` builds the earlier
photograph demo instead (crops of scikit-image's photographs with categories assigned in turn), kept for
comparison with the figures in docs/quickstart-demo.md.
"""

from __future__ import annotations

from typing import Any

from capret.data.demo import DEMO_VERSION, build_demo_dataset, read_demo_marker
from capret.data.garments import WORLD_VERSION, build_world, read_world
from capret.quickstart import QuickstartContext

#: Keys of the demo's report entry, all taken from its build summary.
DEMO_REPORT_KEYS = (
    "train_images",
    "validation_images",
    "identities_train",
    "identities_validation",
    "query_items",
    "gallery_items",
)
#: DeepFashion2 identities of the quickstart's garment world.
GARMENT_IDENTITIES = 120
#: FashionIQ images of the quickstart's world. About a third of them (the held-out families) form the val
#: galleries, one per category, so each holds ~100 images: a random ranking's R@10 is ~0.1 there, and R@10 / R@50
#: separate methods (with the 120 of earlier versions a gallery held 10-18 images and R@10 was ~0.7 by chance).
#: Real FashionIQ val galleries hold 3,800-6,300 images per category.
CIR_IDENTITIES = 900
#: image-text (pretraining) identities of the quickstart's world, two images each (~1,700 training pairs): the
#: tiny CLIP's only data. With the 240 of earlier versions (390 pairs) the CLIP trained for 300 steps retrieved half
#: as well on pairs of an independently rendered world (image-to-text R@1 0.020 vs 0.033 over 400 pairs).
PRETRAIN_IDENTITIES = 1000
#: the world options a cached build must match to be reused
WORLD_OPTIONS = {
    "identities": GARMENT_IDENTITIES,
    "cir_identities": CIR_IDENTITIES,
    "pretrain_identities": PRETRAIN_IDENTITIES,
}


def _garments(ctx: QuickstartContext) -> dict[str, Any]:
    root = ctx.garment_world()
    summary = read_world(root)
    options = summary.get("options", {}) if summary else {}
    if (
        summary is None
        or summary.get("seed") != ctx.seed
        or summary.get("version") != WORLD_VERSION
        or any(options.get(key) != value for key, value in WORLD_OPTIONS.items())
    ):
        summary = build_world(
            root,
            seed=ctx.seed,
            identities=GARMENT_IDENTITIES,
            cir_identities=CIR_IDENTITIES,
            pretrain_identities=PRETRAIN_IDENTITIES,
        ).to_dict()
    counts = summary["counts"]
    return {
        "world": "garments",
        "root": str(root),
        "version": summary["version"],
        "render_seconds": summary.get("seconds"),
        "images_per_second": summary.get("images_per_second"),
        **{key: int(value) for key, value in counts.items()},
    }


def run(ctx: QuickstartContext) -> dict[str, Any]:
    """Build (or reuse) the world and hand the split folders and ground-truth files to later stages.

    A completed build with the same seed, version and size is reused, so re-running the quickstart does not
    redo the data; anything else is rebuilt from scratch. Sets ``ctx.state["splits"]`` (split name -> folder),
    ``ctx.state["query_gt"]`` and ``ctx.state["gallery_gt"]`` (the validation ground-truth files).
    """
    if ctx.world == "garments":
        report = _garments(ctx)
    else:
        marker = read_demo_marker(ctx.data_root)
        if marker is None or marker.get("seed") != ctx.seed or marker.get("version") != DEMO_VERSION:
            marker = build_demo_dataset(ctx.data_root, ctx.seed)
        report = {
            "world": "demo",
            "root": str(ctx.data_root),
            **{k: int(marker[k]) for k in DEMO_REPORT_KEYS},
        }
    ctx.state["splits"] = {split: ctx.data_root / split for split in ("train", "validation")}
    ctx.state["query_gt"] = ctx.data_root / "validation" / "query_gt.json"
    ctx.state["gallery_gt"] = ctx.data_root / "validation" / "gallery_gt.json"
    return report
