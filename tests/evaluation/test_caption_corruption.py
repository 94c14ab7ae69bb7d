"""Caption corruptions: exact counts, nested choices across rates, shuffles that move every chosen caption."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from capret.evaluation.caption_corruption import (
    ATTRIBUTE_WORDS,
    corrupt_caption_map,
    corrupt_captions,
    replace_attributes,
)

CAPTIONS: list[str | None] = [f"A red short sleeve top number {i}. It looks plain." for i in range(20)]
CAPTIONS[3] = None
CAPTIONS[11] = None


def _changed(out: list[str | None]) -> set[int]:
    return {i for i, (a, b) in enumerate(zip(CAPTIONS, out)) if a != b}


def test_rate_zero_is_identity_and_none_stays_none() -> None:
    for mode in ("shuffle", "drop", "replace"):
        assert corrupt_captions(CAPTIONS, mode=mode, rate=0.0) == CAPTIONS
        out = corrupt_captions(CAPTIONS, mode=mode, rate=1.0, seed=3)
        assert out[3] is None and out[11] is None


def test_drop_counts_and_nested_choices() -> None:
    dropped = {r: {i for i, c in enumerate(corrupt_captions(CAPTIONS, mode="drop", rate=r)) if c is None} - {3, 11}
               for r in (0.25, 0.5, 1.0)}  # fmt: skip
    assert [len(dropped[r]) for r in (0.25, 0.5, 1.0)] == [round(0.25 * 18), 9, 18]
    assert dropped[0.25] <= dropped[0.5] <= dropped[1.0]  # the same items first, whatever the mode
    replaced = _changed(corrupt_captions(CAPTIONS, mode="replace", rate=0.5))
    assert replaced == dropped[0.5]


def test_shuffle_moves_every_chosen_caption_and_keeps_the_multiset() -> None:
    out = corrupt_captions(CAPTIONS, mode="shuffle", rate=0.5, seed=1)
    assert Counter(c for c in out if c) == Counter(c for c in CAPTIONS if c)
    assert len(_changed(out)) == 9  # captions are distinct here, so every chosen item got another's caption


def test_replace_swaps_each_attribute_word_within_its_group() -> None:
    text = "A dark grey short sleeve top with some red. It looks plain. It is long and narrow."
    out = replace_attributes(text, rng=np.random.default_rng(0))
    assert out != text and "dark grey" not in out and "short sleeve top" not in out
    assert out.startswith("A ") and out.endswith(".") and " with some " in out and "It looks " in out
    words = {w for group in ATTRIBUTE_WORDS.values() for w in group}
    skeleton = text
    for word in sorted(words, key=len, reverse=True):
        skeleton = skeleton.replace(word, "#")
    assert skeleton == "A # # with some #. It looks #. It is # and #."
    assert replace_attributes("No attribute here.", rng=np.random.default_rng(0)) == "No attribute here."


def test_caption_map_and_errors() -> None:
    table = {"a": "red top", "b": "blue skirt", "c": "green dress"}
    assert corrupt_caption_map(table, ["a", "b", "c", "d"], mode="drop", rate=1.0) == {}
    assert sorted(corrupt_caption_map(table, ["a", "b", "c"], mode="shuffle", rate=1.0).values()) == sorted(
        table.values()
    )
    with pytest.raises(ValueError, match="valid: shuffle, drop, replace"):
        corrupt_captions(CAPTIONS, mode="swap", rate=0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        corrupt_captions(CAPTIONS, mode="drop", rate=1.5)
