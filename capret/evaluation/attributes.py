"""Per-attribute accuracy of predicted garment attributes against the truth (scoring only).

A captioner that describes garments by attributes (the ``clip`` caption backend) is scored by how often each
attribute it chose is the true one. The truth enters here, after the predictions are made, and nowhere else.
Beside each accuracy stands the *majority* rate — the accuracy of always answering the most common true value —
because several attributes are unbalanced (most garments are plain), so an accuracy means something only above
it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["SCORED_ATTRIBUTES", "attribute_accuracy"]

#: attributes scored by :func:`attribute_accuracy`, in report order (``secondary_colour`` only where patterned)
SCORED_ATTRIBUTES: tuple[str, ...] = (
    "category", "colour", "pattern", "secondary_colour", "neckline", "length", "details", "material",
)  # fmt: skip


def _value(attributes: Mapping[str, Any], key: str) -> Any:
    value = attributes.get(key)
    if key == "details":
        return tuple(sorted(value or ()))
    return value


def attribute_accuracy(
    predicted: Sequence[Mapping[str, Any]], truth: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, float]]:
    """``{attribute: {"accuracy", "majority", "count"}}`` over the items whose truth has that attribute.

    ``details`` is compared as a set (every detail right, none extra). ``secondary_colour`` is scored only on
    items whose true pattern is not ``solid`` (a plain garment has no second colour). An attribute no true item
    has is left out.
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} true attribute dicts")
    out: dict[str, dict[str, float]] = {}
    for key in SCORED_ATTRIBUTES:
        pairs = [
            (_value(p, key), _value(t, key))
            for p, t in zip(predicted, truth)
            if t.get(key) is not None
            and (key != "secondary_colour" or t.get("pattern") not in (None, "solid"))
        ]
        if not pairs:
            continue
        counts = Counter(t for _, t in pairs)
        out[key] = {
            "accuracy": sum(p == t for p, t in pairs) / len(pairs),
            "majority": counts.most_common(1)[0][1] / len(pairs),
            "count": float(len(pairs)),
        }
    return out
