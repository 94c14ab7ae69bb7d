from __future__ import annotations

from pathlib import Path

import pytest

from capret.data import create_dataset, list_datasets

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_registry_lists_and_rejects() -> None:
    assert list_datasets() == ["circo", "cirr", "deepfashion2", "demo", "fashioniq"]
    with pytest.raises(KeyError, match="unknown dataset 'coco'; valid names: circo, cirr"):
        create_dataset("coco", root=".", split="val")


@pytest.mark.skipif(not (SHARED / "circo").is_dir(), reason="shared data not beside the repository")
def test_create_real_circo() -> None:
    dataset = create_dataset("circo", root=SHARED / "circo", split="val")
    assert len(dataset) == 220
