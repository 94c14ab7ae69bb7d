"""The garment world's image-text pretraining split: product and street images with alt-text-like captions.

A contrastive image-text model (CLIP, Radford et al., 2021) learns from web alt-texts: noisy descriptions that
name some attributes in no fixed order, leave others out and carry words unrelated to the picture ("free
shipping", a size, a product code). Each identity here gets a product photo and a crop of a street photo around
it (the view a captioner sees when it is given a detected item), and each image its own alt-text written by
:func:`~.vocab.describe` from the identity's attributes with a random subset left out and noise words around.

Lines of ``train.jsonl`` / ``val.jsonl``: ``{"image": "images/<file>.jpg", "text": "<alt text>"}``; the image
path is relative to the folder holding the jsonl files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from capret.data.garments.paint import Garment
from capret.data.garments.patterns import sample_look
from capret.data.garments.records import STREAM_PRETRAIN, Identity, PartOptions
from capret.data.garments.sampling import companion_attributes, companions_for
from capret.data.garments.scenes import consumer_photo, shop_photo
from capret.data.garments.vocab import describe

__all__ = ["NOISE_PREFIXES", "NOISE_SUFFIXES", "alt_text", "write_pretrain"]

NOISE_PREFIXES: tuple[str, ...] = (
    "new", "women's", "men's", "sale:", "hot", "2024", "summer", "casual", "classic", "trendy", "best seller",
)  # fmt: skip
NOISE_SUFFIXES: tuple[str, ...] = (
    "free shipping", "size m", "size s-xl", "shop now", "limited offer", "new arrival", "fast delivery",
    "great gift", "regular fit", "machine washable",
)  # fmt: skip
_DROP = 0.3  # chance that an attribute other than the category is left out of an alt-text
_DROP_CATEGORY = 0.08


def alt_text(attributes: Mapping[str, Any], rng: np.random.Generator) -> str:
    """A web-like description: some attributes left out, varied order and template, noise words around."""
    kept: dict[str, Any] = {}
    for key, value in attributes.items():
        drop = _DROP_CATEGORY if key == "category" else _DROP
        kept[key] = value if rng.random() >= drop else None
    text = describe(kept, rng=rng)
    if rng.random() < 0.5:
        text = f"{NOISE_PREFIXES[int(rng.integers(len(NOISE_PREFIXES)))]} {text}"
    if rng.random() < 0.5:
        text = f"{text} - {NOISE_SUFFIXES[int(rng.integers(len(NOISE_SUFFIXES)))]}"
    if rng.random() < 0.15:
        text = f"{text} sku {int(rng.integers(10000, 99999))}"
    return text


def write_pretrain(root: Path, part: PartOptions) -> tuple[list[Identity], dict[str, int]]:
    """Write two images per identity (a product photo and a street-photo crop) and the jsonl files."""
    drawn, splits = part.draw(STREAM_PRETRAIN, prefix="pre-")
    (root / "images").mkdir(parents=True)
    people: list[Identity] = []
    lines: dict[str, list[str]] = {"train": [], "validation": []}
    for index, (fam, attributes, look) in enumerate(tqdm(drawn, desc="garments pretrain", unit="identity",
                                                         disable=not part.progress)):  # fmt: skip
        irng = part.identity_rng(STREAM_PRETRAIN, index)
        split = splits[fam]
        person = Identity(id=f"pre-{index:05d}", attributes=attributes, family=fam, dataset="pretrain",
                          split=split, images=[])  # fmt: skip
        people.append(person)
        garment = Garment(attributes, look)
        shop = shop_photo(garment, size=part.shop_size, rng=irng)
        worn = bool(irng.random() < 0.75)
        garments = [garment]
        for category in companions_for(str(attributes["category"]), irng) if worn else []:
            garments.append(Garment(companion_attributes(category, irng), sample_look(irng)))
        street = consumer_photo(garments, size=part.size, worn=worn, rng=irng)
        main = [item for item in street.items if item.garment == 0]
        crop = street.image
        if main:
            x1, y1, x2, y2 = main[0].bbox
            pad = 0.08 * max(x2 - x1, y2 - y1)
            box = (max(0, int(x1 - pad)), max(0, int(y1 - pad)),
                   min(crop.width, int(x2 + pad)), min(crop.height, int(y2 + pad)))  # fmt: skip
            crop = crop.crop(box)
        for kind, image, quality in (("shop", shop.image, shop.quality), ("street", crop, street.quality)):
            name = f"{person.id}-{kind}.jpg"
            image.save(root / "images" / name, format="JPEG", quality=quality)
            person.images.append(f"pretrain/images/{name}")
            record = {"image": f"images/{name}", "text": alt_text(attributes, irng)}
            lines[split].append(json.dumps(record))
    for split, file in (("train", "train.jsonl"), ("validation", "val.jsonl")):
        (root / file).write_text("".join(f"{line}\n" for line in lines[split]))
    counts = {
        "pretrain_images": 2 * len(people),
        "pretrain_train_pairs": len(lines["train"]),
        "pretrain_val_pairs": len(lines["validation"]),
    }
    return people, counts
