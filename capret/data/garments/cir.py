"""The garment world's composed-retrieval split in FashionIQ's layout (Wu et al., CVPR 2021).

FashionIQ pairs a reference product image with a target of the same category and two relative captions that
say how the target differs ("is darker", "has long sleeves"). Here a family of garments shares category and
look and its members differ from the base in one or two attributes; every ordered pair of members whose
attributes differ in one or two ways becomes a triplet, and both captions are written from the attribute
difference with varied phrasing: absolute ("is navy with white stripes") or relative ("is darker", "is
longer"). The captions read the truth (they are the annotation, as FashionIQ's annotators saw both images).

Categories map onto FashionIQ's three: ``dress`` <- the four dresses; ``shirt`` <- long sleeve top and both
outwear; ``toptee`` <- short sleeve top, vest, sling. Bottoms have no FashionIQ category and are not drawn.
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
from capret.data.garments.records import STREAM_FIQ, Identity, PartOptions, split_families
from capret.data.garments.sampling import family
from capret.data.garments.scenes import shop_photo
from capret.data.garments.vocab import LENGTHS, luminance

__all__ = ["FIQ_CATEGORIES", "difference", "fiq_category", "relative_captions", "write_fashioniq"]

FIQ_CATEGORIES: dict[str, tuple[str, ...]] = {
    "dress": ("short sleeve dress", "long sleeve dress", "vest dress", "sling dress"),
    "shirt": ("long sleeve top", "short sleeve outwear", "long sleeve outwear"),
    "toptee": ("short sleeve top", "vest", "sling"),
}
#: the attributes a FashionIQ pair may differ in (``sleeve`` changes the DeepFashion2 category with it)
CIR_KEYS: tuple[str, ...] = (
    "colour", "pattern", "secondary_colour", "details", "neckline", "length", "material", "sleeve",
)  # fmt: skip
_COMPARED = ("colour", "secondary_colour", "pattern", "neckline", "length", "sleeve", "details", "material")
_FIQ_SPLITS = {"train": "train", "validation": "val"}


def fiq_category(category: str) -> str | None:
    """The FashionIQ category of a DeepFashion2 category name (``None`` for bottoms)."""
    for name, members in FIQ_CATEGORIES.items():
        if category in members:
            return name
    return None


def difference(reference: Mapping[str, Any], target: Mapping[str, Any]) -> list[str]:
    """The attribute keys in which ``target`` differs from ``reference`` (a changed pattern subsumes the second
    colour it brings)."""
    keys = [k for k in _COMPARED if _norm(reference.get(k)) != _norm(target.get(k))]
    if "pattern" in keys and "secondary_colour" in keys:
        keys.remove("secondary_colour")
    return keys


def _norm(value: Any) -> Any:
    return tuple(sorted(value)) if isinstance(value, list) else value


def _pick(options: list[str], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


_PATTERN_TEXT = {
    "solid": ["is plain", "has no pattern", "is a solid colour"],
    "horizontal stripes": ["has {s} horizontal stripes", "is striped", "has stripes across"],
    "vertical stripes": ["has vertical {s} stripes", "is pinstriped", "has vertical stripes"],
    "checks": ["is checked", "has a {s} check pattern", "is plaid"],
    "dots": ["has {s} polka dots", "is dotted", "has dots"],
    "print": ["has a {s} print", "is printed", "has a busy print"],
}
_NECK_TEXT = {
    "crew neck": ["has a round neck", "has a crew neck"],
    "v-neck": ["has a v-neck", "has a v-shaped neckline"],
    "square neck": ["has a square neckline", "has a square neck"],
    "collar": ["has a collar", "is collared"],
}
_DETAIL_ADD = {"buttons": ["has buttons", "is buttoned"], "pockets": ["has pockets", "adds pockets"],
               "zip": ["has a zip", "zips up"], "logo": ["has a logo", "shows a logo"]}  # fmt: skip
_DETAIL_DROP = {"buttons": ["has no buttons"], "pockets": ["has no pockets", "is without pockets"],
                "zip": ["has no zip"], "logo": ["has no logo", "is without the logo"]}  # fmt: skip
_SLEEVE_TEXT = {"short": ["has short sleeves"], "long": ["has long sleeves"],
                "none": ["is sleeveless", "has no sleeves"], "straps": ["has thin straps", "is strappy"]}  # fmt: skip
_MATERIAL_TEXT = ["is {m}", "is made of {m}", "looks like {m}"]
_SLEEVE_RANK = {"straps": 0, "none": 1, "short": 2, "long": 3}


def _phrase(
    key: str, reference: Mapping[str, Any], target: Mapping[str, Any], rng: np.random.Generator
) -> str:
    """One phrase saying how ``target`` differs from ``reference`` in ``key``."""
    second = str(target.get("secondary_colour") or "")
    if key == "colour":
        change = luminance(str(target["colour"])) - luminance(str(reference["colour"]))
        options = [f"is {target['colour']}", f"is {target['colour']} instead", f"comes in {target['colour']}"]
        if abs(change) > 0.15:
            word = "darker" if change < 0 else "lighter"
            options += [f"is {word}", f"is {word} and {target['colour']}"]
        return _pick(options, rng)
    if key == "pattern":
        return _pick(_PATTERN_TEXT[str(target["pattern"])], rng).format(s=second).replace("  ", " ")
    if key == "secondary_colour":
        noun = {"horizontal stripes": "stripes", "vertical stripes": "stripes", "checks": "checks",
                "dots": "dots", "print": "print"}[str(target["pattern"])]  # fmt: skip
        return _pick(
            [f"has {second} {noun}", f"has {second} {noun} instead", f"its {noun} are {second}"], rng
        )
    if key == "neckline":
        if target.get("neckline") is None:
            return "has no neckline"
        return _pick(_NECK_TEXT[str(target["neckline"])], rng)
    if key == "length":
        longer = LENGTHS.index(str(target["length"])) > LENGTHS.index(str(reference["length"]))
        word = "longer" if longer else "shorter"
        extra = {"cropped": "is cropped", "regular": "is regular length", "long": "is long"}[
            str(target["length"])
        ]
        return _pick([f"is {word}", extra, f"is a bit {word}"], rng)
    if key == "sleeve":
        ref_rank = _SLEEVE_RANK.get(str(reference.get("sleeve")), 0)
        tgt = str(target.get("sleeve"))
        options = list(_SLEEVE_TEXT[tgt])
        if _SLEEVE_RANK[tgt] >= 2 and ref_rank >= 2:
            options.append("has longer sleeves" if _SLEEVE_RANK[tgt] > ref_rank else "has shorter sleeves")
        return _pick(options, rng)
    if key == "details":
        before, after = set(reference.get("details") or ()), set(target.get("details") or ())
        added, dropped = sorted(after - before), sorted(before - after)
        words = [_pick(_DETAIL_ADD[d], rng) for d in added] + [_pick(_DETAIL_DROP[d], rng) for d in dropped]
        return " and ".join(words)
    if key == "material":
        return _pick(_MATERIAL_TEXT, rng).format(m=target["material"])
    raise KeyError(key)


def relative_captions(
    reference: Mapping[str, Any], target: Mapping[str, Any], rng: np.random.Generator
) -> list[str]:
    """Two relative captions of the difference (one or two attributes), each a different phrasing.

    With two changes the first caption names both and the second names both in the other order or, one time
    in four, only one of them (as one of FashionIQ's two annotators often does).
    """
    keys = difference(reference, target)
    if not keys:
        raise ValueError("reference and target have the same attributes; nothing to caption")
    first = [_phrase(k, reference, target, rng) for k in keys]
    order = list(reversed(keys))
    if len(keys) > 1 and rng.random() < 0.25:
        order = [keys[int(rng.integers(len(keys)))]]
    for _ in range(8):
        second = [_phrase(k, reference, target, rng) for k in order]
        if second != first or len(keys) > 1:
            break
    return [" and ".join(first), " and ".join(second)]


def _family_members(category: str, rng: np.random.Generator, *, size: int) -> list[dict[str, Any]]:
    """A base and variants of 1-2 changes that stay in the base's FashionIQ category, all distinct."""
    return family(
        category,
        rng,
        members=size,
        keys=CIR_KEYS,
        keep=lambda candidate: fiq_category(str(candidate["category"])) == fiq_category(category),
        distinct=difference,
        tries_per_member=40,
    )


def write_fashioniq(root: Path, part: PartOptions) -> tuple[list[Identity], dict[str, int]]:
    """Write ``part.identities`` product images (``part.shop_size`` pixels) and their triplets in FashionIQ's
    layout under ``root``.

    The families are drawn here (:func:`_family_members`: variants of a base that stay in its FashionIQ
    category), not by :meth:`PartOptions.draw`, whose families share one attribute set; the family split, the
    per-image generators and the sizes are the part's (``part.family_size`` is not used: a family holds 3-5).
    """
    seed = part.seed
    identities = part.identities
    rng = np.random.default_rng([seed, STREAM_FIQ, 0])
    names = list(FIQ_CATEGORIES)
    drawn: list[tuple[str, dict[str, Any], Any]] = []
    index = 0
    while len(drawn) < identities:
        fiq = names[index % len(names)]
        members = FIQ_CATEGORIES[fiq]
        category = members[int(rng.integers(len(members)))]
        look = sample_look(rng)
        size_of_family = min(int(rng.integers(3, 6)), max(1, identities - len(drawn)))
        for attributes in _family_members(category, rng, size=size_of_family):
            drawn.append((f"fiq-f{index:04d}", attributes, look))
        index += 1
    drawn = drawn[:identities]
    splits = split_families(drawn, fraction=part.validation_fraction, rng=rng)
    (root / "images").mkdir(parents=True)
    (root / "captions").mkdir()
    (root / "image_splits").mkdir()
    people: list[Identity] = []
    for i, (fam, attributes, look) in enumerate(tqdm(drawn, desc="garments fashioniq", unit="image",
                                                     disable=not part.progress)):  # fmt: skip
        irng = part.identity_rng(STREAM_FIQ, i)
        name = f"gw{i:05d}"
        photo = shop_photo(Garment(attributes, look), size=part.shop_size, rng=irng)
        photo.image.save(root / "images" / f"{name}.jpg", format="JPEG", quality=photo.quality)
        people.append(Identity(id=name, attributes=attributes, family=fam, dataset="fashioniq",
                               split=_FIQ_SPLITS[splits[fam]], images=[f"fashioniq/images/{name}.jpg"]))  # fmt: skip
    counts: dict[str, int] = {"fashioniq_images": len(people)}
    crng = np.random.default_rng([seed, STREAM_FIQ, 2])
    for fiq in names:
        for split in ("train", "val"):
            group = [
                p for p in people if p.split == split and fiq_category(str(p.attributes["category"])) == fiq
            ]
            triplets = []
            for ref in group:
                for tgt in group:
                    if ref.family != tgt.family or ref.id == tgt.id:
                        continue
                    if 1 <= len(difference(ref.attributes, tgt.attributes)) <= 2:
                        captions = relative_captions(ref.attributes, tgt.attributes, crng)
                        triplets.append({"target": tgt.id, "candidate": ref.id, "captions": captions})
            (root / "captions" / f"cap.{fiq}.{split}.json").write_text(json.dumps(triplets, indent=1))
            gallery = [p.id for p in group]
            (root / "image_splits" / f"split.{fiq}.{split}.json").write_text(json.dumps(gallery))
            counts[f"fashioniq_{fiq}_{split}_triplets"] = len(triplets)
    counts["fashioniq_triplets"] = sum(v for k, v in counts.items() if k.endswith("_triplets"))
    return people, counts
