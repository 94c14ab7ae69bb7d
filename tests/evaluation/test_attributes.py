"""Per-attribute accuracy against the truth, checked against a hand count."""

from __future__ import annotations

import pytest

from capret.evaluation.attributes import attribute_accuracy

TRUTH = [
    {"category": "skirt", "colour": "red", "pattern": "solid", "secondary_colour": None, "details": []},
    {"category": "skirt", "colour": "navy", "pattern": "checks", "secondary_colour": "white", "details": ["zip"]},
    {"category": "vest", "colour": "red", "pattern": "dots", "secondary_colour": "black",
     "details": ["buttons", "logo"]},
]  # fmt: skip
PREDICTED = [
    {"category": "skirt", "colour": "red", "pattern": "solid", "details": []},
    {"category": "vest", "colour": "navy", "pattern": "checks", "secondary_colour": "black", "details": ["zip"]},
    {"category": "vest", "colour": "blue", "pattern": "dots", "secondary_colour": "black",
     "details": ["logo", "buttons"]},
]  # fmt: skip


def test_accuracy_and_majority_by_hand() -> None:
    got = attribute_accuracy(PREDICTED, TRUTH)
    assert got["category"] == {"accuracy": pytest.approx(2 / 3), "majority": pytest.approx(2 / 3), "count": 3}
    assert got["colour"]["accuracy"] == pytest.approx(2 / 3)
    assert got["pattern"]["accuracy"] == 1.0 and got["pattern"]["majority"] == pytest.approx(1 / 3)
    # second colour: only the two patterned items; one right
    assert got["secondary_colour"] == {"accuracy": 0.5, "majority": 0.5, "count": 2}
    # details are sets: order does not matter, an empty set is a value
    assert got["details"]["accuracy"] == 1.0
    assert "material" not in got  # no true item has one


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 predictions for 3"):
        attribute_accuracy(PREDICTED[:2], TRUTH)
