from __future__ import annotations

import pytest
from repo_paths import SHARED_DATA

from capret.data import create_dataset, list_datasets

SHARED = SHARED_DATA


def test_registry_lists_and_rejects() -> None:
    assert list_datasets() == ["circo", "cirr", "deepfashion2", "demo", "fashioniq"]
    with pytest.raises(KeyError, match="unknown dataset 'coco'; valid names: circo, cirr"):
        create_dataset("coco", root=".", split="val")


@pytest.mark.usefixtures("shared_data")
def test_create_real_circo() -> None:
    dataset = create_dataset("circo", root=SHARED / "circo", split="val")
    assert len(dataset) == 220
