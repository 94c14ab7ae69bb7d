"""Unlabeled image sources (folders and webdataset shards), keyword spans and caption corpora for LinCIR."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tiny_zeroshot import write_caption_store, write_image_folder, write_shards

from capret.data.image_sources import open_image_source
from capret.data.keywords import keyword_spans, read_caption_corpus, replace_keywords
from capret.errors import DataError


def test_folder_and_shards(tmp_path: Path) -> None:
    folder = open_image_source(write_image_folder(tmp_path / "folder", n=5))
    assert folder.keys == sorted(folder.keys) and len(folder) == 5 and folder.keys[0].startswith("part0/")
    assert folder.load(folder.keys[0]).mode == "RGB"
    shards = open_image_source(write_shards(tmp_path / "shards", n=6, per_shard=4))
    assert (
        shards.keys[:2] == ["shard-00000.tar/000000.png", "shard-00000.tar/000001.png"] and len(shards) == 6
    )
    assert shards.load("shard-00001.tar/000005.png").size[0] > 0  # random access into the second shard
    one = open_image_source(tmp_path / "shards" / "shard-00001.tar")
    assert one.keys == ["shard-00001.tar/000004.png", "shard-00001.tar/000005.png"]
    assert len(open_image_source(tmp_path / "folder", limit=2)) == 2
    with pytest.raises(DataError, match="not in this source"):
        folder.load("nope.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        open_image_source(tmp_path / "empty")


@pytest.mark.parametrize(
    ("caption", "spans", "edited"),
    [
        ("a man riding a horse on the beach", ["a man", "a horse", "the beach"], "$ riding $ on $"),
        (
            "is shiny and silver with shorter sleeves",
            ["shiny", "silver", "shorter sleeves"],
            "is $ and $ with $",
        ),
        ("Two dogs playing in the snow.", ["two dogs", "the snow"], "$ playing in $ ."),
    ],
)
def test_keyword_spans(caption: str, spans: list[str], edited: str) -> None:
    assert keyword_spans(caption) == spans
    assert replace_keywords(caption) == edited


def test_fallbacks() -> None:
    assert replace_keywords("") == "a photo of $"
    edited = replace_keywords("and with the", rng=random.Random(0))
    assert edited.split().count("$") == 1 and len(edited.split()) == 3


def test_caption_corpora(tmp_path: Path) -> None:
    store = write_caption_store(tmp_path / "c.jsonl", ["a red dress", "a blue  shirt"])
    assert read_caption_corpus(store) == ["a red dress", "a blue shirt"]
    (tmp_path / "c.txt").write_text("one\n\ntwo\n")
    assert read_caption_corpus(tmp_path / "c.txt", limit=1) == ["one"]
    (tmp_path / "c.json").write_text('["x", "y"]')
    assert read_caption_corpus(tmp_path / "c.json") == ["x", "y"]
    with pytest.raises(DataError, match="not found"):
        read_caption_corpus(tmp_path / "missing.txt")
