"""Drawing identities: attribute dicts in families that share most attributes, and outfit companions.

An *identity* is one garment (one attribute dict and one :class:`~.patterns.Look`). Identities come in
*families*: the members share category, colour and look and differ from the family's base in one or two of the
finer attributes (pattern, second colour, details, neckline, material, length), so telling a garment from its
siblings takes a fine distinction, as in real shop catalogues where one cut comes in several prints.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from capret.data.garments.vocab import (
    BOTTOMS,
    CATEGORIES,
    COLOURS,
    DETAILS,
    DRESSES,
    LENGTHS,
    MATERIALS,
    NECKLINES,
    OUTWEAR,
    PATTERNS,
    TOPS,
    luminance,
    sleeve_of,
)

__all__ = [
    "VARIABLE",
    "attributes_for",
    "categories_cycle",
    "companion_attributes",
    "companions_for",
    "family",
    "variant",
]

#: Attributes a family member may change relative to its base.
VARIABLE: tuple[str, ...] = ("pattern", "secondary_colour", "details", "neckline", "material", "length")
_PATTERN_P = np.array([0.35, 0.13, 0.13, 0.13, 0.13, 0.13])


def _has_neckline(category: str) -> bool:
    return category not in BOTTOMS and sleeve_of(category) != "straps"


def _allowed_details(category: str) -> tuple[str, ...]:
    if sleeve_of(category) == "straps":
        return ("buttons", "logo", "pockets")
    return DETAILS


def _secondary(colour: str, rng: np.random.Generator) -> str:
    """A second colour that contrasts with the first in lightness (stripes and dots must show)."""
    names = [c for c in COLOURS if c != colour and abs(luminance(c) - luminance(colour)) > 0.22]
    return names[int(rng.integers(len(names)))]


def _details(category: str, rng: np.random.Generator) -> list[str]:
    allowed = list(_allowed_details(category))
    count = int(rng.choice(3, p=[0.35, 0.45, 0.2]))
    chosen = [allowed[i] for i in rng.permutation(len(allowed))[:count]]
    if "zip" in chosen and "buttons" in chosen:
        chosen.remove("buttons")
    return sorted(chosen, key=DETAILS.index)


def attributes_for(category: str, rng: np.random.Generator, *, colour: str | None = None) -> dict[str, Any]:
    """A random attribute dict of ``category`` (keys of :data:`~.vocab.ATTRIBUTE_KEYS`)."""
    colour = colour or list(COLOURS)[int(rng.integers(len(COLOURS)))]
    pattern = PATTERNS[int(rng.choice(len(PATTERNS), p=_PATTERN_P))]
    return {
        "category": category,
        "colour": colour,
        "secondary_colour": None if pattern == "solid" else _secondary(colour, rng),
        "pattern": pattern,
        "neckline": NECKLINES[int(rng.integers(len(NECKLINES)))] if _has_neckline(category) else None,
        "length": LENGTHS[int(rng.integers(len(LENGTHS)))],
        "sleeve": sleeve_of(category),
        "details": _details(category, rng),
        "material": MATERIALS[int(rng.integers(len(MATERIALS)))],
    }


def _change(attributes: dict[str, Any], key: str, rng: np.random.Generator) -> bool:
    """Change one attribute in place to a different valid value; ``False`` when it cannot change."""
    category = attributes["category"]
    if key == "pattern":
        options = [p for p in PATTERNS if p != attributes["pattern"]]
        attributes["pattern"] = options[int(rng.integers(len(options)))]
        if attributes["pattern"] == "solid":
            attributes["secondary_colour"] = None
        elif attributes["secondary_colour"] is None:
            attributes["secondary_colour"] = _secondary(attributes["colour"], rng)
        return True
    if key == "secondary_colour":
        if attributes["pattern"] == "solid":
            return False
        options = [c for c in COLOURS if c != attributes["secondary_colour"]]
        fresh = _secondary(attributes["colour"], rng)
        attributes["secondary_colour"] = fresh if fresh in options else options[0]
        return True
    if key == "colour":
        options = [c for c in COLOURS if c not in (attributes["colour"], attributes["secondary_colour"])]
        attributes["colour"] = options[int(rng.integers(len(options)))]
        if attributes["secondary_colour"] is not None:
            attributes["secondary_colour"] = _secondary(attributes["colour"], rng)
        return True
    if key == "neckline":
        if not _has_neckline(category):
            return False
        options = [n for n in NECKLINES if n != attributes["neckline"]]
        attributes["neckline"] = options[int(rng.integers(len(options)))]
        return True
    if key == "material":
        options = [m for m in MATERIALS if m != attributes["material"]]
        attributes["material"] = options[int(rng.integers(len(options)))]
        return True
    if key == "length":
        options = [n for n in LENGTHS if n != attributes["length"]]
        attributes["length"] = options[int(rng.integers(len(options)))]
        return True
    if key == "details":
        current = list(attributes["details"])
        allowed = [d for d in _allowed_details(category) if d not in current]
        if current and (not allowed or rng.random() < 0.5):
            current.remove(current[int(rng.integers(len(current)))])
        else:
            add = allowed[int(rng.integers(len(allowed)))]
            current.append(add)
            if add in ("zip", "buttons"):
                current = [d for d in current if d not in ({"zip", "buttons"} - {add})]
        attributes["details"] = sorted(current, key=DETAILS.index)
        return True
    if key == "sleeve":  # same garment family, other sleeves: the category changes with it
        group = DRESSES if category in DRESSES else (*TOPS, *OUTWEAR) if category not in BOTTOMS else ()
        options = [c for c in group if c != category and (c in OUTWEAR) == (category in OUTWEAR)]
        if not options:
            return False
        attributes["category"] = options[int(rng.integers(len(options)))]
        attributes["sleeve"] = sleeve_of(attributes["category"])
        if not _has_neckline(attributes["category"]):
            attributes["neckline"] = None
        elif attributes["neckline"] is None:
            attributes["neckline"] = NECKLINES[int(rng.integers(len(NECKLINES)))]
        attributes["details"] = [
            d for d in attributes["details"] if d in _allowed_details(attributes["category"])
        ]
        return True
    raise KeyError(key)


def variant(
    base: Mapping[str, Any], rng: np.random.Generator, *, changes: int, keys: tuple[str, ...] = VARIABLE
) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``base`` differing in exactly ``changes`` of ``keys``; returns it and the keys changed."""
    out = {k: (list(v) if isinstance(v, list) else v) for k, v in base.items()}
    changed: list[str] = []
    for index in rng.permutation(len(keys)):
        if len(changed) == changes:
            break
        key = keys[int(index)]
        if key == "secondary_colour" and "pattern" in changed:
            continue
        if _change(out, key, rng):
            changed.append(key)
    return out, changed


def family(
    category: str,
    rng: np.random.Generator,
    *,
    members: int,
    keys: tuple[str, ...] = VARIABLE,
    keep: Callable[[dict[str, Any]], bool] | None = None,
    distinct: Callable[[dict[str, Any], dict[str, Any]], object] = operator.ne,
    tries_per_member: int = 50,
) -> list[dict[str, Any]]:
    """Up to ``members`` identities of one category and colour: a base and variants of one or two changes of
    ``keys``, each ``distinct`` from all before it and (with ``keep``) accepted by ``keep``; at most
    ``tries_per_member * members`` variants are drawn, so a family may come out smaller."""
    base = attributes_for(category, rng)
    out = [base]
    tries = 0
    while len(out) < members and tries < tries_per_member * members:
        tries += 1
        candidate, _ = variant(base, rng, changes=int(rng.integers(1, 3)), keys=keys)
        if keep is not None and not keep(candidate):
            continue
        if all(distinct(other, candidate) for other in out):
            out.append(candidate)
    return out


def companions_for(category: str, rng: np.random.Generator) -> list[str]:
    """Categories of the other garments of an outfit worn with ``category`` (zero to two)."""
    tops = ("short sleeve top", "long sleeve top", "vest", "sling")
    bottoms = ("shorts", "trousers", "skirt")
    pick = lambda names: names[int(rng.integers(len(names)))]  # noqa: E731
    if category in BOTTOMS:
        out = [pick(tops)]
        if rng.random() < 0.3:
            out.append(pick(OUTWEAR))
        return out
    if category in OUTWEAR:
        return [pick(tops[:2]), pick(bottoms)] if rng.random() < 0.8 else [pick(bottoms)]
    if category in DRESSES:
        return [pick(OUTWEAR)] if rng.random() < 0.3 else []
    return [pick(bottoms)] + ([pick(OUTWEAR)] if rng.random() < 0.2 else [])


def companion_attributes(category: str, rng: np.random.Generator) -> dict[str, Any]:
    """Attributes of an outfit's other garment; outwear is worn open (never zipped) so the garment beneath,
    the photo's subject, still shows through the front."""
    attributes = attributes_for(category, rng)
    if category in OUTWEAR:
        attributes["details"] = [d for d in attributes["details"] if d != "zip"]
    return attributes


def categories_cycle(count: int, rng: np.random.Generator) -> list[str]:
    """``count`` categories covering the 13 as evenly as possible, in random order."""
    cycle = [CATEGORIES[i % len(CATEGORIES)] for i in range(count)]
    return [cycle[i] for i in rng.permutation(count)]
