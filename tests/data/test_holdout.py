"""Held-out train identities for model selection: whole identities, scorable ones only, seeded, disjoint."""

from __future__ import annotations

import pytest

from capret.data.deepfashion2 import Item
from capret.data.items import split_holdout_identities


def _items() -> list[Item]:
    items = []
    image_id = 0
    for pair in range(1, 41):
        sources = ("shop", "user", "user") if pair % 4 else ("user", "user")  # every 4th has no shop item
        for source in sources:
            image_id += 1
            items.append(Item(image_id=image_id, item_index=1, source=source, pair_id=pair, style=1,
                              category_id=1, category_name="short sleeve top", bbox=(0, 0, 8, 8)))  # fmt: skip
    return items


def test_holdout_takes_whole_scorable_identities_reproducibly() -> None:
    items = _items()
    train, held = split_holdout_identities(items, fraction=0.1, seed=0)
    held_ids = {it.identity for it in held}
    assert len(held_ids) == 3  # round(0.1 * 30 identities with user and shop items)
    assert all(pair % 4 for pair, _ in held_ids)  # never an identity the protocol cannot score
    assert not held_ids & {it.identity for it in train} and len(train) + len(held) == len(items)
    assert split_holdout_identities(items, fraction=0.1, seed=0) == (train, held)
    assert {it.identity for it in split_holdout_identities(items, fraction=0.1, seed=1)[1]} != held_ids
    assert split_holdout_identities(items, fraction=0.0, seed=0) == (items, [])
    assert len({it.identity for it in split_holdout_identities(items, fraction=0.001, seed=0)[1]}) == 1


def test_holdout_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match="data.holdout_identities must be in"):
        split_holdout_identities(_items(), fraction=1.0, seed=0)
    with pytest.raises(ValueError, match="only 1 train identities"):
        split_holdout_identities(_items()[:3], fraction=0.5, seed=0)
