"""How far a category model gets on the garment world, and how far a person gets on the same crops.

    python scripts/category_study.py fit --world DIR [--identities N] [--size 32] [--steps 3000]
    python scripts/category_study.py quiz --world DIR --out quiz.png [--items 24] [--seed 7]
    python scripts/category_study.py score --key quiz.json --answers answers.txt

``fit`` renders a world of ``--identities`` DeepFashion2 identities into DIR when none is there (seed 0, a
handful of FashionIQ and pretraining images), trains one ``pixel-cnn`` member on two thirds of the *train*
identities and prints one JSON object: its accuracy on the held-out third (shop and consumer items apart), and
on the validation items by ``source``, ``occlusion``, ``zoom_in`` and ``viewpoint`` (scored only; nothing is
chosen on them). It is the learning curve behind docs/garments.md's "How far the category model can get".

``quiz`` writes a sheet of consumer-photo tiles of the validation split (the crop the model sees: the box plus
8 % margin, here 48 pixels instead of the model's 24-32) numbered in reading order, and a key (``quiz.json``)
beside it; a person names each tile's category (one per line, the 13 names of ``capret.data.garments.vocab.
CATEGORIES``) without looking at the key, and ``score`` compares.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from capret.data.garments import build_world, read_world
from capret.data.garments.vocab import CATEGORIES
from captioning.category import LabelledRows
from captioning.category_cnn import CnnInputs, CnnTraining, PixelCnnModel, _train_member, tile_inputs
from captioning.sources import CaptionTarget, create_source

_VIEW_FIELDS = ("source", "occlusion", "zoom_in", "viewpoint")
_QUIZ_TILE, _QUIZ_COLUMNS = 128, 8


def _targets(world: Path, split: str) -> list[CaptionTarget]:
    return list(create_source("demo", root=world / "deepfashion2", split=split))


def _inputs(targets: list[CaptionTarget], size: int) -> CnnInputs:
    return CnnInputs.stack(
        [tile_inputs(t.open_image(), t.bbox, size=size, margin=0.08) for t in targets], size=size
    )


def _by_field(targets: list[CaptionTarget], right: list[bool]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for field in _VIEW_FIELDS:
        groups: dict[str, list[bool]] = defaultdict(list)
        for t, ok in zip(targets, right):
            groups[str(t.annotation.get(field))].append(ok)
        out[field] = {
            k: {"items": len(v), "accuracy": round(sum(v) / len(v), 3)} for k, v in sorted(groups.items())
        }
    return out


def fit(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    world = Path(args.world)
    if read_world(world) is None:
        build_world(world, seed=0, identities=args.identities, cir_identities=4, pretrain_identities=4)
    start = time.perf_counter()
    train, validation = _targets(world, "train"), _targets(world, "validation")
    names = sorted({str(t.annotation["category_name"]) for t in train})
    groups = [repr(t.annotation.get("identity")) for t in train]
    rows = LabelledRows(
        _inputs(train, args.size), [str(t.annotation["category_name"]) for t in train], groups
    )
    classes, target = rows.classes_and_targets()
    fold = torch.as_tensor(rows.group_folds(3, seed=0))
    torch.manual_seed(0)
    model = PixelCnnModel(classes=classes, size=args.size, width=args.width, members=1)
    model.fit_standardisation(rows.inputs.geometry)
    training = CnnTraining(size=args.size, width=args.width, steps=args.steps)
    # the package's member recipe (AdamW, warm-up, augmentation, weight average), here for one member only
    _train_member(
        model, 0, rows.inputs[fold != 0], target[fold != 0], training=training, seed=0, max_seconds=None
    )
    held = fold == 0
    held_right = (model.probabilities(rows.inputs[held]).argmax(-1) == target[held]).tolist()
    held_targets = [t for t, h in zip(train, held.tolist()) if h]
    val_pred = model.probabilities(_inputs(validation, args.size)).argmax(-1).tolist()
    val_right = [classes[p] == t.annotation["category_name"] for p, t in zip(val_pred, validation)]
    return {
        "world": str(world),
        "train_identity_groups": len(set(groups)),  # shop-listed garments and outfit companions
        "categories": len(names),
        "size": args.size,
        "width": args.width,
        "steps": args.steps,
        "heldout_items": len(held_right),
        "heldout_accuracy": round(sum(held_right) / len(held_right), 4),
        "heldout_by_source": _by_field(held_targets, held_right)["source"],
        "validation_accuracy": round(sum(val_right) / len(val_right), 4),
        "validation_by_view": _by_field(validation, val_right),
        "seconds": round(time.perf_counter() - start, 1),
    }


def quiz(args: argparse.Namespace) -> dict[str, Any]:
    consumer = [t for t in _targets(Path(args.world), "validation") if t.annotation.get("source") == "user"]
    chosen = random.Random(args.seed).sample(consumer, min(args.items, len(consumer)))
    rows = -(-len(chosen) // _QUIZ_COLUMNS)
    sheet = Image.new("RGB", (_QUIZ_TILE * _QUIZ_COLUMNS, (_QUIZ_TILE + 14) * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for i, t in enumerate(chosen):
        tile, _ = tile_inputs(t.open_image(), t.bbox, size=48, margin=0.08)
        image = Image.fromarray(tile.transpose(1, 2, 0)).resize(
            (_QUIZ_TILE, _QUIZ_TILE), Image.Resampling.NEAREST
        )
        x, y = (i % _QUIZ_COLUMNS) * _QUIZ_TILE, (i // _QUIZ_COLUMNS) * (_QUIZ_TILE + 14)
        sheet.paste(image, (x, y))
        draw.text((x + 2, y + _QUIZ_TILE), str(i), fill="black")
    out = Path(args.out)
    sheet.save(out)
    key = out.with_suffix(".json")
    key.write_text(json.dumps([{"key": t.key, "category": t.annotation["category_name"]} for t in chosen]))
    return {"sheet": str(out), "key": str(key), "items": len(chosen)}


def score(args: argparse.Namespace) -> dict[str, Any]:
    key = json.loads(Path(args.key).read_text())
    answers = [line.strip() for line in Path(args.answers).read_text().splitlines() if line.strip()]
    unknown = sorted(set(answers) - set(CATEGORIES))
    if unknown or len(answers) != len(key):
        raise SystemExit(f"{args.answers}: need {len(key)} lines naming categories; unknown names: {unknown}")
    right = [a == k["category"] for a, k in zip(answers, key)]
    return {"items": len(right), "accuracy": round(sum(right) / len(right), 4)}


#: each command: (run, help, its flags as (name, type, default; None = required))
_COMMANDS: dict[str, tuple[Any, str, list[tuple[str, type, Any]]]] = {
    "fit": (
        fit,
        "learning-curve point: one member on 2/3 of the train identities",
        [("--world", str, None), ("--identities", int, 120), ("--size", int, 32), ("--width", int, 16),
         ("--steps", int, 3000)],
    ),
    "quiz": (
        quiz,
        "a sheet of consumer tiles to name by eye, and its key",
        [("--world", str, None), ("--out", str, None), ("--items", int, 24), ("--seed", int, 7)],
    ),
    "score": (score, "score a person's answers against the quiz key", [("--key", str, None), ("--answers", str, None)]),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (run, help_text, flags) in _COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        for flag, kind, default in flags:
            command.add_argument(flag, type=kind, default=default, required=default is None)
        command.set_defaults(run=run)
    args = parser.parse_args()
    print(json.dumps(args.run(args)))


if __name__ == "__main__":
    main()
