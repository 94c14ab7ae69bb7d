"""The tiny CLIP on the garment world: train (``capret-train`` task ``clip``), then measure what it learnt.

Needs a garment world (``capret data garments --out DIR``, or ``capret.data.garments.world.build_world``).
Trains with ``configs/garments_clip.yaml`` (plus ``key=value`` overrides) on ``DIR/pretrain``, then reports:

* held-out image-to-text / text-to-image R@k on ``pretrain/val.jsonl`` (identities never trained on), with the
  R@1 of a random ranking;
* zero-shot category accuracy on the DeepFashion2 validation items (each photo cropped to its item box; 13
  categories, chance 1/13);
* the ``clip`` caption backend's per-attribute accuracy on the same items. The truth file is read here, by the
  benchmark, to *score* predictions only; the captioner never sees it.

Prints ONE JSON object.

    python scripts/bench/garments_clip.py --world garments [--out runs/bench_clip] [trainer.max_seconds=120 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# scripts/bench holds a captioning.py: drop this folder from the import path so ``import captioning`` finds the
# package, not that script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from capret.config import load_config  # noqa: E402
from capret.data.deepfashion2 import image_path, load_items  # noqa: E402
from capret.data.imagefile import decode_image  # noqa: E402
from capret.evaluation.attributes import attribute_accuracy  # noqa: E402
from capret.inference.query.clip_captioner import ClipAttributeDescriber  # noqa: E402
from capret.tasks.clip import ClipTaskConfig, evaluate_clip, run, zero_shot_category_accuracy  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "garments_clip.yaml"


def _truth_by_item(world: Path) -> dict[str, dict[str, Any]]:
    """``"<split>/<image_id>/<item_index>"`` -> true attributes (for scoring only)."""
    truth = json.loads((world / "truth.json").read_text())["identities"]
    out: dict[str, dict[str, Any]] = {}
    for record in truth.values():
        for ref in record.get("images") or []:
            if not ref.startswith("deepfashion2/") or "#item" not in ref:
                continue
            path, item = ref.split("#item")
            split, image = path.split("/")[1], int(Path(path).stem)
            out[f"{split}/{image}/{int(item)}"] = record["attributes"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, required=True, help="garment world folder")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_garments_clip"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None, help="skip training: score this exported CLIP")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of configs/garments_clip.yaml")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"world": str(args.world)}
    if args.model is None:
        config = load_config(
            ClipTaskConfig,
            CONFIG,
            [f"data.root={args.world / 'pretrain'}", f"trainer.output_dir={args.out}", "trainer.progress=false",
             *args.overrides],
        )  # fmt: skip
        start = time.perf_counter()
        result = run(config)
        report["train"] = {"seconds": round(time.perf_counter() - start, 1), "steps": result["steps"],
                           "train_pairs": result["train_pairs"], "best_step": result["best_step"],
                           "stop_reason": result["stop_reason"]}  # fmt: skip
        model = Path(result["model_dir"])
    else:
        model = args.model
    held = evaluate_clip(model, args.world / "pretrain" / "val.jsonl")
    report["held_out"] = {k: round(v, 4) for k, v in held.items()}
    df2 = args.world / "deepfashion2"
    items = load_items(df2, "validation", progress=False, cache=False)
    images = [decode_image(image_path(df2, "validation", it.image_id)) for it in items]
    boxes = [it.bbox for it in items]
    zs = zero_shot_category_accuracy(model, images, [it.category_name for it in items], boxes=boxes)
    report["zero_shot_category"] = {"accuracy": round(zs["accuracy"], 4), "chance": round(zs["chance"], 4),
                                    "count": zs["count"]}  # fmt: skip
    truth = _truth_by_item(args.world)
    scored = [(i, truth[f"validation/{it.image_id}/{it.item_index}"]) for i, it in enumerate(items)
              if f"validation/{it.image_id}/{it.item_index}" in truth]  # fmt: skip
    describer = ClipAttributeDescriber.from_folder(model)
    start = time.perf_counter()
    predicted = describer.predict([images[i] for i, _ in scored], [boxes[i] for i, _ in scored])
    report["captioner"] = {
        "items": len(scored),
        "seconds": round(time.perf_counter() - start, 2),
        "attributes": {
            k: {m: round(v, 4) for m, v in row.items()}
            for k, row in attribute_accuracy(predicted, [t for _, t in scored]).items()
        },  # fmt: skip
        "example": describer.caption([images[scored[0][0]]], [boxes[scored[0][0]]])[0] if scored else None,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
